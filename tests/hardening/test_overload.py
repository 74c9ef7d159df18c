"""Overload, bounded: the real ``modelgate serve`` with a compute-bound model is offered twice
the goodput it showed at capacity (our Python client, then h2load at a fixed rate), and then
a flood of many times it from several connections. Every answer is OK or RESOURCE_EXHAUSTED
(nothing queues until its deadline), health probes from another process answer within their
1 s deadline, and memory stays flat. Goodput figures come from ``python -m loadtests.overload``
(longer runs, on demand); tests never assert them."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from loadtests.overload import Gateway, Phase, Plan, format_table, run_overload, slow_store
from loadtests.probes import Prober
from loadtests.servers import start_gateway
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.gateway import running_gateway
from tests.support.waiting import until, wait_until

pytestmark = pytest.mark.timeout(240)

# CI durations; the benchmark's defaults are 10 s at capacity, 30 s overloaded, 20 s flood.
PLAN = Plan(capacity_s=3.0, overload_s=8.0, flood_s=0.0, concurrency=8, timeout_s=20.0)
# Four connections of 512 streams each: ten times what the gateway lets in per connection
# (max_concurrent_streams 64), and hundreds of times the model's capacity.
FLOOD = Plan(drivers=("h2load",), capacity_s=1.0, overload_s=1.0, flood_s=8.0, concurrency=8,
             flood_connections=4, flood_streams=512)
MEMORY_BOUND_KIB = 64 << 10


def at_most_resets(phase: Phase, streams: int) -> dict[str, int]:
    """The phase's answers less the CANCELLED streams h2load resets when its time is up (at
    most one per stream it had open), which are its doing, not the gateway's."""
    codes = dict(phase.codes)
    if phase.driver == "h2load" and codes.get("CANCELLED", 0) <= streams:
        codes.pop("CANCELLED", None)
    return codes


def assert_watched_fine(phase: Phase) -> None:
    assert phase.probes.sent > 0, phase.name
    assert phase.probes.failed == 0, (phase.name, phase.probes.failures)
    # Rejected requests are released at once: the peak memory under load stays where the
    # phases before left it.
    assert phase.watch.peak_growth_kib < MEMORY_BOUND_KIB, (phase.name, phase.watch)


def test_twice_the_capacity_is_shed_fast_with_memory_and_health_intact(tmp_path: Path) -> None:
    store = slow_store(tmp_path, layers=128)
    with start_gateway(store, ["--max-inflight-requests", "8"]) as served:
        gateway = Gateway(served.target, served.pid, served.metrics_port)
        phases = run_overload(gateway, "slow", PLAN)
    print("\n" + format_table(phases))
    assert [(p.driver, p.offered_rps is None) for p in phases] == [
        ("python", True), ("python", False), ("h2load", True), ("h2load", False)]
    python_capacity, python_loaded, h2load_capacity, h2load_loaded = phases
    assert set(python_capacity.codes) == {"OK"}
    assert set(at_most_resets(h2load_capacity, PLAN.concurrency)) == {"OK"}
    for loaded in (python_loaded, h2load_loaded):
        codes = at_most_resets(loaded, PLAN.rate_connections * PLAN.rate_streams)
        assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, (loaded.driver, loaded.codes)
    assert python_loaded.dropped_by_client == 0
    for phase in phases:
        assert not phase.client_errors, (phase.name, phase.client_errors)
        assert_watched_fine(phase)


def test_a_flood_of_cheap_requests_leaves_health_probes_answering(tmp_path: Path) -> None:
    # Nearly all of the flood is rejected by the in-flight cap: cheap requests, each still
    # a trip through gRPC and the event loop. What waits ahead of a probe is bounded by
    # connections x max_concurrent_streams (the default, 64); without that bound, 2048
    # requests queue in gRPC ahead of it and most probes run out of time.
    store = slow_store(tmp_path, layers=128)
    with start_gateway(store, ["--max-inflight-requests", "8"]) as served:
        gateway = Gateway(served.target, served.pid, served.metrics_port)
        phases = run_overload(gateway, "slow", FLOOD)
    print("\n" + format_table(phases))
    flood = phases[-1]
    assert flood.name.startswith("flood")
    codes = at_most_resets(flood, FLOOD.flood_connections * 64)
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, flood.codes
    assert codes["RESOURCE_EXHAUSTED"] > 4 * codes["OK"]  # offered: several times what is served
    assert flood.probes.sent >= 4
    assert_watched_fine(flood)


def held_model(root: Path) -> pb.ModelInferRequest:
    """A model whose batcher holds each request for 60 s (until cancelled), and a request."""
    models.write_model(root, "held", 1, models.add_constant(1.0), models.add_model_config(
        "held", extra="dynamic_batching { max_queue_delay_microseconds: 60000000 }\n"))
    request = pb.ModelInferRequest(model_name="held")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    return request


def test_at_the_cap_inference_is_shed_at_once_and_probes_still_answer(tmp_path: Path) -> None:
    # A 60 s queue delay: the one admitted request holds the only slot until cancelled.
    request = held_model(tmp_path)
    with running_gateway(tmp_path, max_inflight_requests=1) as gw:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)
                held = stub.ModelInfer(request, timeout=120)
                await until(lambda: gw.gateway.inflight.inflight == 1, "the held request in flight")
                with pytest.raises(grpc.RpcError) as caught:
                    await stub.ModelInfer(request, timeout=30)
                assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                error: Any = caught.value
                trailers = dict(error.trailing_metadata() or ())
                assert int(trailers["retry-after-ms"]) >= 1
                assert "modelgate-limit" not in trailers  # not a tenant's quota
                health = health_pb2_grpc.HealthStub(channel)
                check = await health.Check(health_pb2.HealthCheckRequest(), timeout=10)
                assert check.status == health_pb2.HealthCheckResponse.SERVING
                assert (await stub.ServerReady(pb.ServerReadyRequest(), timeout=10)).ready
                assert (await stub.ModelReady(pb.ModelReadyRequest(name="held"),
                                              timeout=10)).ready
                await stub.ModelMetadata(pb.ModelMetadataRequest(name="held"), timeout=10)
                held.cancel()
                await until(lambda: gw.gateway.inflight.inflight == 0,
                            "the cancelled request's slot freed")
                answer = stub.ModelInfer(request, timeout=120)  # the slot is free again
                await until(lambda: gw.gateway.inflight.inflight == 1, "the held request in flight")
                answer.cancel()

        asyncio.run(scenario())
        assert gw.gateway.inflight.rejected == 1


def test_calls_beyond_a_connections_streams_wait_in_the_client(tmp_path: Path) -> None:
    # Twelve calls on one connection allowed four streams, each held 300 ms by the batcher:
    # four at a time reach the gateway, the others wait in the client and go in as streams
    # free up. None is refused: gRPC's overload protection, which refuses streams a client
    # keeping to the limit may open (UNAVAILABLE), is off.
    models.write_model(tmp_path, "slowish", 1, models.add_constant(1.0), models.add_model_config(
        "slowish", extra="dynamic_batching { max_queue_delay_microseconds: 300000 }\n"))
    request = pb.ModelInferRequest(model_name="slowish")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(b"\0" * 16)
    with running_gateway(tmp_path, max_concurrent_streams=4) as gw:
        seen: list[int] = []

        async def scenario() -> list[grpc.StatusCode]:
            async with grpc.aio.insecure_channel(gw.target) as channel:
                stub = pb_grpc.GRPCInferenceServiceStub(channel)

                async def one() -> grpc.StatusCode:
                    try:
                        await stub.ModelInfer(request, timeout=60)
                    except grpc.RpcError as exc:
                        code = exc.code()
                        assert isinstance(code, grpc.StatusCode)
                        return code
                    return grpc.StatusCode.OK

                calls = asyncio.gather(*(one() for _ in range(12)))
                while not calls.done():
                    seen.append(gw.gateway.inflight.inflight)
                    await asyncio.sleep(0.005)
                return list(await calls)

        assert asyncio.run(scenario()) == [grpc.StatusCode.OK] * 12
        assert max(seen) == 4, seen
        assert gw.gateway.inflight.rejected == 0


def test_connections_beyond_max_connections_are_closed(tmp_path: Path) -> None:
    held_model(tmp_path)
    with running_gateway(tmp_path, max_connections=2) as gw:

        async def scenario() -> list[str]:
            options = [("grpc.use_local_subchannel_pool", 1)]
            channels = [grpc.aio.insecure_channel(gw.target, options=options)
                        for _ in range(3)]
            outcomes: list[str] = []
            try:
                for channel in channels:  # in turn: the first two hold their connections
                    try:
                        await pb_grpc.GRPCInferenceServiceStub(channel).ServerReady(
                            pb.ServerReadyRequest(), timeout=5)
                        outcomes.append("OK")
                    except grpc.RpcError as exc:
                        outcomes.append(exc.code().name)
            finally:
                for channel in channels:
                    await channel.close(None)
            return outcomes

        assert asyncio.run(scenario()) == ["OK", "OK", "UNAVAILABLE"]


def test_the_prober_counts_probes_that_miss_their_deadline(tmp_path: Path) -> None:
    # The probes must be able to fail: the gateway process is stopped (SIGSTOP) for longer
    # than a probe's deadline, so a probe in flight meanwhile runs out of time.
    models.write_model(tmp_path, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add"))
    with start_gateway(tmp_path) as served, Prober(served.target, deadline_s=0.5) as prober:
        prober.begin()
        os.kill(served.pid, signal.SIGSTOP)
        try:
            wait_until(lambda: prober.peek().failed >= 1, "a probe missing its deadline")
        finally:
            os.kill(served.pid, signal.SIGCONT)
        passed = len(prober.peek().latencies_ms)
        wait_until(lambda: len(prober.peek().latencies_ms) > passed, "a probe passing again")
        probes = prober.end()
    assert probes.failed >= 1 and set(probes.failures) <= {
        "Check DEADLINE_EXCEEDED", "ServerReady DEADLINE_EXCEEDED"}, probes.failures
    assert probes.latencies_ms  # the probes after SIGCONT passed
