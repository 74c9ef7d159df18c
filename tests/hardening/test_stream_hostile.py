"""Hostile ModelStreamInfer clients: idle streams (they take no inference capacity, end after
``stream_idle_s``, and are capped server-wide), floods of messages, cancelled streams and
revoked keys. The memory cases run against the real ``modelgate serve`` process with its
resident memory sampled from /proc; the counting cases run in-process, where the in-flight
count and the open streams can be read."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.hardening.raw_http import GOOD_BODY, INFER, exchange, post
from tests.support import models
from tests.support.gateway import GatewayProcess, RunningGateway, free_port, running_gateway
from tests.support.memory import RssGrowth
from tests.support.waiting import until, wait_until

pytestmark = pytest.mark.timeout(300)

CAP = 4  # max_inflight_requests of the gateways here
# A batch forms only when 4 requests wait: fewer stay in flight as long as a test needs.
GATHER4 = (
    "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 }\n"
)
MEMORY_BOUND = 48 << 20  # what any attack here may add to the server's resident memory


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def message(model: str = "add", request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), 2.0, dtype=np.float32).tobytes())
    return request


async def final(call: Any) -> tuple[grpc.StatusCode, str]:
    """Read a stream to its end: the status it ended with and the status's details."""
    try:
        while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return await call.code(), await call.details()


async def open_streams(target: str, key: str, connections: int, per_connection: int
                       ) -> tuple[list[grpc.aio.Channel], list[Any]]:
    """Streams that each have one message answered (so the server holds them open; served
    or refused at the in-flight cap, as they come at once), then send nothing."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # one connection per channel
    channels = [grpc.aio.insecure_channel(target, options=options) for _ in range(connections)]
    calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
        metadata=bearer(key), timeout=120) for channel in channels
        for _ in range(per_connection)]

    async def first(call: Any) -> None:
        await call.write(message(request_id="first"))
        answer = await call.read()
        assert answer.infer_response.id == "first", answer

    await asyncio.gather(*(first(call) for call in calls))
    return channels, calls


async def close(channels: list[grpc.aio.Channel]) -> None:
    for channel in channels:
        await channel.close(None)


# -- the real process, memory sampled ------------------------------------------------------


@pytest.fixture(scope="module")
def tenants(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, str]:
    """(tenants file, a key that stays, a key revoked by a test)."""
    path = tmp_path_factory.mktemp("stream-tenants") / "tenants.toml"
    assert admin(path, "create", "stays", "--models", "*")[0] == 0
    assert admin(path, "create", "leaving", "--models", "*")[0] == 0
    return path, issue(path, "stays"), issue(path, "leaving")


@pytest.fixture(scope="module")
def process(hardening_store: Path, tenants: tuple[Path, str, str]
            ) -> Iterator[tuple[GatewayProcess, int]]:
    http_port = free_port()
    with GatewayProcess(["--store", str(hardening_store), "--tenants", str(tenants[0]),
                         "--http-port", str(http_port),
                         "--max-inflight-requests", str(CAP)]) as proc:
        yield proc, http_port


def unary_works(target: str, key: str) -> None:
    with grpc.insecure_channel(target) as channel:
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            message(), metadata=bearer(key), timeout=30)
    assert answer.outputs


def test_idle_streams_leave_every_inference_slot_to_requests(
    process: tuple[GatewayProcess, int], tenants: tuple[Path, str, str]
) -> None:
    proc, http_port = process
    _, key, _ = tenants

    async def scenario() -> None:
        # Sixty idle streams on 5 connections, fifteen times the in-flight cap.
        channels, calls = await open_streams(proc.target, key, 5, 12)
        try:
            for _ in range(3):  # unary calls and REST requests still get every slot
                await asyncio.to_thread(unary_works, proc.target, key)
                done = await asyncio.to_thread(
                    exchange, http_port, post(INFER, GOOD_BODY, {"x-api-key": key},
                                              close=True))
                assert done.statuses == [200], done.raw
            # The streams themselves still serve.
            for call in calls[::10]:
                await call.write(message(request_id="again"))
                assert not (await call.read()).error_message
        finally:
            await close(channels)

    with RssGrowth(proc.proc.pid) as growth:
        asyncio.run(scenario())
    assert growth.peak_kib < MEMORY_BOUND >> 10, growth.peak_kib


def test_a_message_flood_from_many_streams_is_bounded(
    process: tuple[GatewayProcess, int], tenants: tuple[Path, str, str]
) -> None:
    proc, _ = process
    _, key, _ = tenants
    codes: dict[str, int] = {}

    async def flood(call: Any, count: int) -> None:
        async def write() -> None:
            for i in range(count):
                await call.write(message(request_id=str(i)))
            await call.done_writing()

        writer = asyncio.create_task(write())
        answers = 0
        async for answer in call:
            answers += 1
            code = (answer.infer_response.parameters["modelgate-code"].string_param
                    if answer.error_message else "OK")
            codes[code] = codes.get(code, 0) + 1
        await writer
        assert answers == count

    async def scenario() -> None:
        options = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(proc.target, options=options) for _ in range(4)]
        try:
            calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                metadata=bearer(key), timeout=120) for channel in channels for _ in range(8)]
            await asyncio.gather(*(flood(call, 200) for call in calls))
        finally:
            await close(channels)

    with RssGrowth(proc.proc.pid) as growth:
        asyncio.run(scenario())
    # Every message answered: served, or refused in-stream at the in-flight cap.
    assert set(codes) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert sum(codes.values()) == 32 * 200 and codes.get("OK", 0) > 0, codes
    assert growth.peak_kib < MEMORY_BOUND >> 10, growth.peak_kib
    unary_works(proc.target, key)


def test_cancelled_streams_leave_nothing_behind(
    process: tuple[GatewayProcess, int], tenants: tuple[Path, str, str]
) -> None:
    proc, _ = process
    _, key, _ = tenants

    async def scenario() -> None:
        for _ in range(5):
            options = [("grpc.use_local_subchannel_pool", 1)]
            channel = grpc.aio.insecure_channel(proc.target, options=options)
            calls = [pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                metadata=bearer(key), timeout=60) for _ in range(50)]
            for call in calls:
                for i in range(5):
                    await call.write(message(request_id=str(i)))
            for call in calls:
                call.cancel()
            await channel.close(None)

    with RssGrowth(proc.proc.pid) as growth:
        asyncio.run(scenario())
    assert growth.peak_kib < MEMORY_BOUND >> 10, growth.peak_kib
    # All CAP slots are free again: CAP concurrent unary calls are served.
    with grpc.insecure_channel(proc.target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        futures = [stub.ModelInfer.future(message(), metadata=bearer(key), timeout=30)
                   for _ in range(CAP)]
        assert all(future.result().outputs for future in futures)


def test_revoking_a_key_ends_its_open_streams(
    process: tuple[GatewayProcess, int], tenants: tuple[Path, str, str]
) -> None:
    proc, _ = process
    path, stays, leaving = tenants

    async def scenario() -> list[tuple[grpc.StatusCode, str]]:
        channels, calls = await open_streams(proc.target, leaving, 2, 50)
        try:
            assert admin(path, "revoke", "leaving")[0] == 0
            return await asyncio.gather(*(final(call) for call in calls))
        finally:
            await close(channels)

    with RssGrowth(proc.proc.pid) as growth:
        ends = asyncio.run(scenario())
    assert {code for code, _ in ends} == {grpc.StatusCode.UNAUTHENTICATED}
    assert growth.peak_kib < MEMORY_BOUND >> 10, growth.peak_kib
    unary_works(proc.target, stays)


# -- in-process: the counts themselves ---------------------------------------------------


@pytest.fixture(scope="module")
def gather_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("gather-store")
    models.write_model(root, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", max_batch_size=8))
    models.write_model(root, "gather4", 1, models.add_constant(1.0),
                       models.add_model_config("gather4", max_batch_size=4, extra=GATHER4))
    return root


def on_loop(gw: RunningGateway, predicate: Any, what: str) -> Any:
    return asyncio.wrap_future(asyncio.run_coroutine_threadsafe(until(predicate, what),
                                                                gw.loop))


def test_stream_messages_in_flight_count_against_the_cap_and_cancel_frees_them(
    gather_store: Path
) -> None:
    with running_gateway(gather_store, max_inflight_requests=3) as gw:
        inflight = gw.gateway.inflight

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                call = stub.ModelStreamInfer(timeout=60)
                for i in range(3):  # they wait in the batcher for a fourth
                    await call.write(message("gather4", str(i)))
                await on_loop(gw, lambda: inflight.inflight == 3, "three messages in flight")
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.ModelInfer(message(), timeout=10)
                assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit of 3 concurrent" in (refused.value.details() or "")
                call.cancel()
                await on_loop(gw, lambda: inflight.inflight == 0, "the slots freed")
                assert (await stub.ModelInfer(message(), timeout=10)).outputs

        asyncio.run(scenario())


def test_open_streams_are_capped_server_wide(gather_store: Path) -> None:
    with running_gateway(gather_store, max_open_streams=3) as gw:

        async def scenario() -> None:
            channels, calls = await open_streams(gw.target, "", 3, 1)
            try:
                stub = pb_grpc.GRPCInferenceServiceStub(channels[0])
                extra = stub.ModelStreamInfer(timeout=30)
                code, details = await final(extra)
                assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "limit of 3 open streams" in details
                await calls[0].done_writing()
                assert (await final(calls[0]))[0] is grpc.StatusCode.OK
                await on_loop(gw, lambda: gw.gateway.streams.open_streams == 2, "one closed")
                again = stub.ModelStreamInfer(timeout=30)
                await again.write(message(request_id="again"))
                assert (await again.read()).infer_response.id == "again"
                await again.done_writing()
            finally:
                await close(channels)

        asyncio.run(scenario())


def test_an_idle_stream_ends_after_stream_idle_s_and_a_busy_one_does_not(
    gather_store: Path
) -> None:
    with running_gateway(gather_store, stream_idle_s=1.0) as gw:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                idle = stub.ModelStreamInfer(timeout=60)
                busy = stub.ModelStreamInfer(timeout=60)
                await idle.write(message(request_id="only"))
                assert (await idle.read()).infer_response.id == "only"
                # The busy stream sends a message every tenth of the idle timeout, for
                # longer than the idle one lives; it is never cut.
                answered = 0
                while not idle.done():
                    await busy.write(message(request_id=str(answered)))
                    assert not (await busy.read()).error_message
                    answered += 1
                    await asyncio.sleep(0.1)
                code, details = await final(idle)
                assert code is grpc.StatusCode.UNAVAILABLE
                assert "stream_idle_s" in details, details
                await busy.done_writing()
                assert (await final(busy))[0] is grpc.StatusCode.OK
                assert answered > 0

        asyncio.run(scenario())
        wait_until(lambda: gw.gateway.streams.open_streams == 0, "both streams closed")
