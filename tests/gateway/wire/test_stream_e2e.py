"""ModelStreamInfer end to end: the real gateway in-process, called by tritonclient's sync
and aio streaming clients and by raw grpc.aio streams (bytes, cancel, never reading)."""

from __future__ import annotations

import asyncio
import queue
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.grpc.aio as tc_aio
from prometheus_client.parser import text_string_to_metric_families

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import until, wait_until

pytestmark = pytest.mark.timeout(180)

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
# A batch forms only when 4 requests wait: fewer stay queued as long as a test needs.
GATHER4 = (
    "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 }\n"
)
MAX_INFLIGHT = 8
WIDE = 1024  # 4 KiB a row


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    models.write_model(root, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", max_batch_size=64))
    models.write_model(root, "wide", 1, models.add_constant(1.0, width=WIDE),
                       models.add_model_config("wide", width=WIDE, max_batch_size=64))
    models.write_model(root, "gather4", 1, models.add_constant(1.0),
                       models.add_model_config("gather4", max_batch_size=4, extra=GATHER4))
    return root


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tenants") / "tenants.toml"
    admin(path, "create", "acme", "--models", "add", "gather4", "wide")
    admin(path, "create", "rate", "--models", "add", "--requests-per-s", "0.01", "--burst", "2")
    return path


@pytest.fixture(scope="module")
def key(tenants_file: Path) -> str:
    return issue(tenants_file, "acme")


@pytest.fixture(scope="module")
def gateway(store: Path, tenants_file: Path, key: str) -> Iterator[RunningGateway]:
    # ``key`` is issued before the gateway reads the file.
    with running_gateway(store, tenants=tenants_file, stream_max_inflight=MAX_INFLIGHT) as gw:
        yield gw


def cygrpc_eof() -> object:
    """grpc.aio.EOF (untyped in grpc's stubs): what read() returns at the stream's end."""
    eof: object = getattr(grpc.aio, "EOF")  # noqa: B009
    return eof


def code_of(value: object) -> grpc.StatusCode:
    code = value.code() if isinstance(value, grpc.aio.AioRpcError) else value
    assert isinstance(code, grpc.StatusCode)
    return code


async def final_code(call: Any) -> grpc.StatusCode:
    """Reads the stream's answers to its end; the status it ended with."""
    try:
        while await call.read() is not cygrpc_eof():
            pass
    except grpc.aio.AioRpcError as exc:
        return code_of(exc)
    return code_of(await call.code())


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def message(model: str = "add", rows: int = 1, request_id: str = "", width: int = 4,
            parameters: dict[str, str] | None = None) -> pb.ModelInferRequest:
    req = pb.ModelInferRequest(model_name=model, id=request_id)
    req.inputs.add(name="x", datatype="FP32", shape=[rows, width])
    req.raw_input_contents.append(np.full((rows, width), 2.0, dtype=np.float32).tobytes())
    for name, value in (parameters or {}).items():
        req.parameters[name].string_param = value
    return req


def tc_input(value: float = 2.0) -> tc.InferInput:
    tensor = tc.InferInput("x", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.full((1, 4), value, dtype=np.float32))
    return tensor


def stream_counts(gateway: RunningGateway) -> dict[str, float]:
    """modelgate_protocol_requests_total{protocol="grpc_stream"} by code."""
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (sample.name == "modelgate_protocol_requests_total"
                    and sample.labels.get("protocol") == "grpc_stream"):
                counts[sample.labels["code"]] = sample.value
    return counts


def statistics(gateway: RunningGateway, key: str, model: str) -> tuple[int, int]:
    reply = gateway.stub().ModelStatistics(pb.ModelStatisticsRequest(name=model),
                                           metadata=bearer(key), timeout=10)
    return (sum(s.inference_count for s in reply.model_stats),
            sum(s.execution_count for s in reply.model_stats))


def test_tritonclient_sync_stream_answers_each_message_and_goes_on_after_errors(
    gateway: RunningGateway, key: str
) -> None:
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    before = stream_counts(gateway)
    client = tc.InferenceServerClient(gateway.target)
    try:
        client.start_stream(callback=lambda result, error: answers.put((result, error)),
                            headers={"authorization": f"Bearer {key}"})
        client.async_stream_infer("add", [tc_input(1.0)], request_id="a")
        client.async_stream_infer("nope", [tc_input()], request_id="b")  # unknown model
        wrong = tc.InferInput("y", [1, 4], "FP32")  # not the model's input
        wrong.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        client.async_stream_infer("add", [wrong], request_id="c")
        client.async_stream_infer("add", [tc_input(5.0)], request_id="d")
        got = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    results = {r.get_response().id: r.as_numpy("y") for r, e in got if e is None}
    errors = sorted(str(e) for r, e in got if e is not None)
    assert set(results) == {"a", "d"}
    np.testing.assert_allclose(results["a"], np.full((1, 4), 2.0))
    np.testing.assert_allclose(results["d"], np.full((1, 4), 6.0))
    assert len(errors) == 2
    assert any("nope" in e for e in errors) and any("'y'" in e or "y" in e for e in errors)
    after = stream_counts(gateway)
    assert after.get("OK", 0) - before.get("OK", 0) == 2
    assert sum(after.values()) - sum(before.values()) == 4


def test_tritonclient_aio_stream_infer(gateway: RunningGateway, key: str) -> None:
    async def run() -> list[tuple[str, float]]:
        client = tc_aio.InferenceServerClient(gateway.target)

        async def requests() -> Any:
            for i in range(6):
                yield {"model_name": "add", "inputs": [tc_input(float(i))],
                       "request_id": str(i)}

        out = []
        try:
            async for result, error in client.stream_infer(
                    requests(), headers={"authorization": f"Bearer {key}"}):
                assert error is None
                out.append((result.get_response().id, float(result.as_numpy("y")[0, 0])))
        finally:
            await client.close()
        return out

    answered = asyncio.run(run())
    assert sorted(answered) == [(str(i), float(i) + 1.0) for i in range(6)]


def test_an_undecodable_message_gets_an_in_stream_error_and_the_stream_goes_on(
    gateway: RunningGateway, key: str
) -> None:
    with grpc.insecure_channel(gateway.target) as channel:
        call = channel.stream_stream(STREAM, None, None)
        raws = [b"\xff\xff\xff", message(request_id="ok").SerializeToString()]
        answers = [pb.ModelStreamInferResponse.FromString(a)
                   for a in call(iter(raws), metadata=bearer(key), timeout=30)]
    assert len(answers) == 2
    bad = [a for a in answers if a.error_message]
    good = [a for a in answers if not a.error_message]
    assert len(bad) == 1 and "not a valid ModelInferRequest" in bad[0].error_message
    assert bad[0].infer_response.parameters["modelgate-code"].string_param == "INVALID_ARGUMENT"
    assert [g.infer_response.id for g in good] == ["ok"]


def test_a_stream_without_a_valid_key_is_refused_at_open(gateway: RunningGateway) -> None:
    stub = gateway.stub()
    with pytest.raises(grpc.RpcError) as caught:
        list(stub.ModelStreamInfer(iter([message()]), metadata=bearer("mg_acme_" + "x" * 40),
                                   timeout=30))
    assert caught.value.code() is grpc.StatusCode.UNAUTHENTICATED


def test_quota_hit_on_a_stream_names_the_limit_with_the_retry_hint(
    gateway: RunningGateway, tenants_file: Path
) -> None:
    rate_key = issue(tenants_file, "rate")
    wait_until(lambda: _works(gateway, rate_key), "the tenants file reload", timeout=15)
    stub = gateway.stub()
    registry = gateway.gateway.metrics.registry
    counted = {"tenant": "rate", "limit": "requests_per_s"}
    before = registry.get_sample_value("modelgate_tenant_quota_rejections_total", counted)
    answers = list(stub.ModelStreamInfer(
        iter([message(request_id=str(i)) for i in range(4)]), metadata=bearer(rate_key),
        timeout=30))
    assert len(answers) == 4
    refused = [a for a in answers if a.error_message]
    assert refused, "a burst of 2 (one spent by the reload probe) cannot pass 4 messages"
    # Each refused message counts under its tenant and the limit that refused it.
    after = registry.get_sample_value("modelgate_tenant_quota_rejections_total", counted)
    assert (after or 0) - (before or 0) == len(refused)
    for answer in refused:
        # tritonclient's callback sees only the text: it names the message's id first.
        assert answer.error_message.startswith(f"id '{answer.infer_response.id}': ")
        params = answer.infer_response.parameters
        assert params["modelgate-code"].string_param == "RESOURCE_EXHAUSTED"
        assert params["modelgate-limit"].string_param
        assert int(params["retry-after-ms"].string_param) > 0
        assert answer.infer_response.id in {"0", "1", "2", "3"}


def _works(gateway: RunningGateway, key: str) -> bool:
    try:
        gateway.stub().ModelMetadata(pb.ModelMetadataRequest(name="add"), metadata=bearer(key),
                                     timeout=10)
    except grpc.RpcError:
        return False
    return True


def test_cancel_drops_queued_messages_which_never_run(gateway: RunningGateway, key: str) -> None:
    streams = gateway.gateway.streams
    before = statistics(gateway, key, "gather4")

    async def run() -> None:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            call = channel.stream_stream(STREAM, None, None)(None, metadata=bearer(key),
                                                              timeout=60)
            for i in range(2):
                await call.write(message("gather4", request_id=str(i)).SerializeToString())
            # Both messages wait in the batcher for two more that never come.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                until(lambda: sum(len(s.tasks) for s in streams._open) == 2,
                      "two queued stream messages"), gateway.loop))
            call.cancel()
        await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
            until(lambda: streams.open_streams == 0, "the cancelled stream to end"),
            gateway.loop))

    asyncio.run(run())
    # Four unary requests now form one batch of four: the cancelled two are not in it.
    stub = gateway.stub()
    futures = [stub.ModelInfer.future(message("gather4"), metadata=bearer(key), timeout=60)
               for _ in range(4)]
    for future in futures:
        future.result()
    inferences, executions = statistics(gateway, key, "gather4")
    assert (inferences - before[0], executions - before[1]) == (4, 1)


def test_a_revoked_key_ends_an_open_stream(
    gateway: RunningGateway, tenants_file: Path
) -> None:
    admin(tenants_file, "create", "leaving", "--models", "add")
    leaving = issue(tenants_file, "leaving")
    wait_until(lambda: _works(gateway, leaving), "the tenants file reload", timeout=15)

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(metadata=bearer(leaving), timeout=60)
            await call.write(message(request_id="first"))
            first = await call.read()
            assert not first.error_message and first.infer_response.id == "first"
            assert admin(tenants_file, "revoke", "leaving")[0] == 0
            return await final_code(call)

    assert asyncio.run(run()) is grpc.StatusCode.UNAUTHENTICATED


def test_a_hundred_concurrent_streams(gateway: RunningGateway, key: str) -> None:
    async def run() -> list[list[str]]:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(n: int) -> list[str]:
                requests = [message(request_id=f"{n}-{i}") for i in range(5)]
                call = stub.ModelStreamInfer(iter(requests), metadata=bearer(key), timeout=60)
                answers = [a async for a in call]
                assert not [a.error_message for a in answers if a.error_message]
                return sorted(a.infer_response.id for a in answers)

            return await asyncio.gather(*(one(n) for n in range(100)))

    answered = asyncio.run(run())
    assert answered == [sorted(f"{n}-{i}" for i in range(5)) for n in range(100)]


def test_a_stream_that_never_reads_its_answers_is_not_read_past_the_bound(
    gateway: RunningGateway, key: str
) -> None:
    """The client writes far more than HTTP/2's windows hold and reads nothing: once the
    answers fill the windows, grpc takes no more, the stream's max_inflight messages wait,
    and the gateway stops reading, so what it has taken stays bounded; when the client
    reads, everything is answered."""
    streams = gateway.gateway.streams
    total = 600
    big = message("wide", rows=16, width=WIDE).SerializeToString()  # 64 KiB in and out

    def taken() -> int:
        return sum(s.messages for s in list(streams._open))

    def parked() -> bool:
        return any(s.places.locked() and getattr(s.places, "_waiters", None)
                   for s in list(streams._open))

    async def run() -> int:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            call = channel.stream_stream(STREAM, None, None)(None, metadata=bearer(key),
                                                              timeout=120)

            async def write() -> None:
                for _ in range(total):
                    await call.write(big)
                await call.done_writing()

            writer = asyncio.create_task(write())
            # The reader parks on the stream's bound (max_inflight messages read and not
            # yet taken by grpc): a reader without one would read all and never park.
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                until(parked, "the stream's reader waiting at its bound"), gateway.loop))
            assert not writer.done(), "the client wrote everything though nothing was read"
            held = taken()
            answered = 0
            async for raw in call:
                assert not pb.ModelStreamInferResponse.FromString(raw).error_message
                answered += 1
            await writer
            assert answered == total
            return held

    held = asyncio.run(run())
    assert 0 < held < total // 2


def test_shutdown_ends_open_streams_unavailable_after_the_grace_period(store: Path) -> None:
    with running_gateway(store) as gw:
        streams = gw.gateway.streams

        async def run() -> grpc.StatusCode:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                call = stub.ModelStreamInfer(timeout=60)
                await call.write(message("gather4", request_id="stuck"))
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                    until(lambda: streams.open_streams == 1, "the open stream"), gw.loop))
                stopping = asyncio.wrap_future(asyncio.run_coroutine_threadsafe(
                    gw.gateway.stop(grace=0.5), gw.loop))
                try:
                    while await call.read() is not cygrpc_eof():
                        pass
                except grpc.aio.AioRpcError as exc:
                    await stopping
                    return code_of(exc)
                await stopping
                return code_of(await call.code())

        assert asyncio.run(run()) is grpc.StatusCode.UNAVAILABLE


def test_labels_and_routing_keys_apply_per_message(tmp_path: Path) -> None:
    """x-model-label and x-routing-key from the stream's metadata, overridden by a message's
    own parameter: each message lands where the unary rules put it."""
    from gateway.models.routing import choose_weighted, split_point
    from model_store.labels import parse_routing
    from tests.gateway.models.test_routing import ROUTING

    config = models.add_model_config("adder", extra="version_policy: { all {} }\n")
    for version in (1, 2):
        models.write_model(tmp_path, "adder", version, models.add_constant(float(version)),
                           config)
    (tmp_path / "adder" / "routing.toml").write_text(ROUTING, encoding="utf-8")
    weights = tuple((1 if t == "stable" else 2, w) for t, w in parse_routing(ROUTING).weights)
    keys = [f"customer-{i}" for i in range(40)]
    with running_gateway(tmp_path) as gw:
        requests = [message("adder", request_id=f"key-{k}", parameters={"x-routing-key": k})
                    for k in keys]
        labelled = [*requests, message("adder", request_id="label-stream"),
                    message("adder", request_id="label-canary",
                            parameters={"x-model-label": "canary"})]
        answers = list(gw.stub().ModelStreamInfer(
            iter(labelled), metadata=(("x-model-label", "stable"),), timeout=30))
        assert not [a.error_message for a in answers if a.error_message]
        versions = {a.infer_response.id: int(a.infer_response.model_version) for a in answers}
        # The stream's label pins the version for messages with only a routing key, as a
        # label does for a unary call with both; a message's own label comes first.
        assert {versions[f"key-{k}"] for k in keys} == {1}
        assert versions["label-canary"] == 2 and versions["label-stream"] == 1
        answers = list(gw.stub().ModelStreamInfer(iter(requests), timeout=30))
    versions = {a.infer_response.id: int(a.infer_response.model_version) for a in answers}
    expected = {f"key-{k}": choose_weighted(weights, split_point("adder", k)) for k in keys}
    assert versions == expected and set(expected.values()) == {1, 2}


def test_the_stream_deadline_bounds_its_messages(gateway: RunningGateway, key: str) -> None:
    """A message that cannot run before the stream's deadline (it waits for a batch of four
    that never fills) is never run: the stream ends DEADLINE_EXCEEDED and the gateway lets
    the message go."""
    streams = gateway.gateway.streams
    before = statistics(gateway, key, "gather4")

    async def run() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            call = stub.ModelStreamInfer(metadata=bearer(key), timeout=1.0)
            await call.write(message("gather4", request_id="late"))
            return await final_code(call)

    assert asyncio.run(run()) is grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: streams.open_streams == 0, "the stream to close")
    assert statistics(gateway, key, "gather4") == before
