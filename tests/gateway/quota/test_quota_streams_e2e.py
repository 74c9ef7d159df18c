"""The per-tenant ``streams`` limit end to end: the real gateway (in-process with the
in-process and the Redis store, and ``modelgate serve --workers 2`` sharing /dev/shm) and
real grpc.aio ModelStreamInfer clients. A tenant at its limit is refused the next stream
with the limit named, gets it back when one of its streams ends, and never starves another
tenant's unary requests or streams."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.gateway.process.test_workers import _workers
from tests.gateway.quota.test_quota_e2e import request, tenants
from tests.gateway.quota.test_quota_shared_e2e import _accepted_by
from tests.gateway.wire.test_stream_e2e import bearer, cygrpc_eof, final_code
from tests.support import models
from tests.support.gateway import GatewayProcess, RunningGateway, running_gateway
from tests.support.redis_server import RedisServer, fresh_redis
from tests.support.waiting import until, wait_until

pytestmark = pytest.mark.timeout(240)

STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    yield from fresh_redis()


@dataclass
class Served:
    """A gateway under test: its address, the tenants' keys, and (in-process) the gateway."""

    target: str
    keys: dict[str, str]
    running: RunningGateway | None = None
    workers: list[int] | None = None  # with --workers: their pids
    port: int = 0


@pytest.fixture(params=["local", "redis", "workers"])
def served(request: pytest.FixtureRequest, tmp_path: Path,
           redis_server: RedisServer) -> Iterator[Served]:
    store = tmp_path / "store"
    models.write_model(store, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", max_batch_size=64))
    path = tmp_path / "tenants.toml"
    keys = tenants(path, ("two", ["--streams", "2"]), ("other", ["--streams", "2"]))
    if request.param == "workers":
        args = ["--workers", "2", "--store", str(store), "--tenants", str(path)]
        with GatewayProcess(args) as process:
            wait_until(lambda: process.log().count("modelgate serving") >= 2, timeout=60)
            workers = _workers(process)
            assert len(workers) == 2, process.log()
            yield Served(process.target, keys, workers=workers, port=process.port)
        return
    overrides: dict[str, Any] = {"tenants": path}
    if request.param == "redis":
        redis_server.flush()
        overrides["redis_url"] = redis_server.url
    with running_gateway(store, **overrides) as gw:
        yield Served(gw.target, keys, gw)


class Streams:
    """grpc.aio channels of their own (one connection each, so ``--workers`` spreads them)
    and the streams opened on them."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channels: list[grpc.aio.Channel] = []

    def channel(self) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(
            self.target, options=[("grpc.use_local_subchannel_pool", 1)])
        self.channels.append(channel)
        return channel

    async def open(self, key: str, deadline_s: float = 120) -> Any:
        """A stream of ``key``'s tenant that answered one message: it is open and counted."""
        call = self.channel().stream_stream(
            STREAM, request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString,
        )(metadata=bearer(key), timeout=deadline_s)
        await call.write(request())
        answer = await call.read()
        assert answer is not cygrpc_eof() and not answer.error_message, answer
        return call

    async def refused(self, key: str) -> dict[str, str]:
        """Open a stream that must be refused; its trailers."""
        # Refused as it opens, before any message: none is sent, so none races the refusal.
        call = self.channel().stream_stream(STREAM)(metadata=bearer(key), timeout=60)
        assert await final_code(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = await call.trailing_metadata()
        return {k: str(v) for k, v in trailers or ()}

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def _unary_ok(target: str, key: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelInfer(request(), metadata=bearer(key), timeout=30)
        assert reply.outputs


async def _ended(call: Any) -> grpc.StatusCode:
    await call.done_writing()
    return await final_code(call)


def test_a_tenant_at_its_streams_limit_is_refused_and_gets_it_back(served: Served) -> None:
    async def run() -> None:
        streams = Streams(served.target)
        try:
            two = served.keys["two"]
            first, second = await streams.open(two), await streams.open(two)
            # Refused on other connections too; with --workers, tried until the connections
            # reached both workers (each goes to either), so some refusal came from a worker
            # holding fewer than two of the tenant's streams itself: the count is shared.
            refused = 0
            while refused < 2 or (served.workers is not None and _accepted_by(
                    served.workers, served.port) != set(served.workers)):
                assert refused < 32, "every connection went to one worker"
                trailers = await streams.refused(two)
                assert trailers["modelgate-limit"] == "streams"
                assert int(trailers["retry-after-ms"]) > 0
                refused += 1
            if served.running is not None:  # counted by limit, like a refused request
                registry = served.running.gateway.metrics.registry
                assert registry.get_sample_value(
                    "modelgate_tenant_quota_rejections_total",
                    {"tenant": "two", "limit": "streams"}) == 2
            # The other tenant is not starved: its requests and its streams pass.
            await _unary_ok(served.target, served.keys["other"])
            others = [await streams.open(served.keys["other"]) for _ in range(2)]
            await _unary_ok(served.target, two)  # a streams limit charges no request
            # A stream that ended (half-close, answered, OK) gives its place back at once.
            assert await _ended(first) == grpc.StatusCode.OK
            third = await streams.open(two)
            for call in (second, third, *others):
                assert await _ended(call) == grpc.StatusCode.OK
        finally:
            await streams.close()

    asyncio.run(run())


@pytest.mark.parametrize("served", ["local", "redis"], indirect=True)
def test_a_cancelled_or_expired_stream_gives_its_place_back(served: Served) -> None:
    running = served.running
    assert running is not None

    def open_streams() -> int:
        return running.gateway.streams.open_streams

    async def run() -> None:
        streams = Streams(served.target)
        try:
            two = served.keys["two"]
            # One stream the client cancels, one that runs past its deadline.
            cancelled, expiring = await streams.open(two), await streams.open(two, deadline_s=5)
            cancelled.cancel()
            await until(lambda: open_streams() == 1, "the cancelled stream ended")
            replacement = await streams.open(two)
            assert await final_code(expiring) == grpc.StatusCode.DEADLINE_EXCEEDED
            await until(lambda: open_streams() == 1, "the expired stream ended")
            last = await streams.open(two)
            assert (await streams.refused(two))["modelgate-limit"] == "streams"
            for call in (replacement, last):
                assert await _ended(call) == grpc.StatusCode.OK
        finally:
            await streams.close()

    asyncio.run(run())
