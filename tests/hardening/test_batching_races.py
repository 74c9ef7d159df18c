"""Cancellation and deadlines racing with the real dynamic batcher over a real ONNX Runtime
session: a request withdrawn while queued never runs, every answer holds the caller's own
rows, and no queue slot or in-flight count leaks; then the same storm over gRPC."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.batching.batcher import DynamicBatcher
from gateway.errors import RequestTimeoutError
from model_store.repository import ModelRepository
from model_store.spec import ModelId
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from runtimes.base import InferRequest, Runtime, RuntimeMetadata, Tensor
from runtimes.onnx_runtime import OnnxOptions, OnnxRuntime
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(300)

WIDTH = 4


class GatedRuntime(Runtime):
    """The real ONNX runtime, recording the row ids of every executed batch; while the gate
    is shut, executions wait (holding the batcher's only instance) so the queue fills."""

    def __init__(self, inner: OnnxRuntime) -> None:
        self.inner = inner
        self.model = inner.model
        self.spec = inner.spec
        self.gate = asyncio.Event()
        self.gate.set()
        self.executed: list[int] = []
        self.run = 0

    async def load(self) -> None:
        await self.inner.load()

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        # Only the current run's members count: a run that failed may leave a batch behind.
        for member in request.members or (request,):
            tags = member.context
            assert isinstance(tags, dict)
            if tags.get("run") == self.run:
                self.executed.extend([int(tags["id"])] * int(tags["rows"]))
        await self.gate.wait()
        return await self.inner.infer(request)

    async def unload(self) -> None:
        await self.inner.unload()

    def metadata(self) -> RuntimeMetadata:
        return self.inner.metadata()


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("race-store")
    # No queue delay: a request goes as soon as the instance is free, so while the gate
    # holds the one instance everything else waits in the queue.
    models.write_model(root, "now", 1, models.add_constant(1.0), models.add_model_config(
        "now", max_batch_size=8, extra="dynamic_batching { }\n"))
    models.write_model(root, "batched", 1, models.add_constant(1.0), models.add_model_config(
        "batched", max_batch_size=8,
        extra="dynamic_batching { max_queue_delay_microseconds: 5000 }\n"))
    return root


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def gated(store: Path, loop: asyncio.AbstractEventLoop) -> Iterator[GatedRuntime]:
    entry = ModelRepository(store).scan()["now"]
    assert entry.spec is not None
    runtime = GatedRuntime(OnnxRuntime(ModelId("now", 1), entry.spec, entry.version_files[1],
                                       OnnxOptions(device="cpu")))
    loop.run_until_complete(runtime.load())
    yield runtime
    loop.run_until_complete(runtime.unload())


def rows_of(request_id: int, rows: int) -> np.ndarray:
    # Row r of request i holds i*16 + r in every column: any row tells whose it is.
    base = np.arange(rows, dtype=np.float32)[:, None] + request_id * 16
    return np.repeat(base, WIDTH, axis=1)


def request(request_id: int, rows: int, run: int, deadline: float | None = None) -> (
    InferRequest
):
    return InferRequest(inputs={"x": rows_of(request_id, rows)}, rows=rows, deadline=deadline,
                        context={"run": run, "id": request_id, "rows": rows})


plans = st.lists(
    st.tuples(st.integers(1, 3), st.sampled_from(["keep", "cancel", "expire", "cancel_late"])),
    min_size=1, max_size=24,
)


@given(plan=plans)
def test_withdrawn_requests_never_run_and_answers_are_never_swapped(
    gated: GatedRuntime, loop: asyncio.AbstractEventLoop,
    plan: list[tuple[int, str]],
) -> None:
    loop.run_until_complete(_run_plan(gated, plan))


async def _run_plan(gated: GatedRuntime, plan: list[tuple[int, str]]) -> None:
    batcher = DynamicBatcher(gated)
    gated.executed.clear()
    gated.run += 1
    gated.gate.clear()
    blocker = batcher.enqueue(request(999, 1, gated.run))  # holds the only instance
    await asyncio.sleep(0)
    futures: dict[int, asyncio.Future[dict[str, Tensor]]] = {}
    for request_id, (rows, fate) in enumerate(plan):
        # Far enough ahead to be queued first even on a busy machine (else the batcher
        # refuses it at once, which is as good: it never runs).
        deadline = time.monotonic() + 0.05 if fate == "expire" else None
        try:
            futures[request_id] = batcher.enqueue(request(request_id, rows, gated.run, deadline))
        except RequestTimeoutError as exc:
            failed: asyncio.Future[dict[str, Tensor]] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            futures[request_id] = failed
    for request_id, (_, fate) in enumerate(plan):
        if fate == "cancel":
            futures[request_id].cancel()
    expiring = [futures[i] for i, (_, fate) in enumerate(plan) if fate == "expire"]
    # Past every "expire" deadline the batcher's timer answers those requests.
    await until(lambda: all(f.done() for f in expiring), "queued requests expired")
    withdrawn = {i for i, (_, fate) in enumerate(plan) if fate in ("cancel", "expire")}
    gated.gate.set()
    await asyncio.sleep(0)
    for request_id, (_, fate) in enumerate(plan):
        if fate == "cancel_late":  # races with dispatch: may or may not have run
            futures[request_id].cancel()
    results = await asyncio.gather(*futures.values(), return_exceptions=True)
    await blocker
    executed = gated.executed
    assert not withdrawn & set(executed)
    assert all(executed.count(i) == rows for i, (rows, _) in enumerate(plan) if i in executed)
    for (request_id, (rows, fate)), result in zip(enumerate(plan), results, strict=True):
        if fate == "expire":
            assert isinstance(result, RequestTimeoutError)
        elif fate == "cancel":
            assert isinstance(result, asyncio.CancelledError)
        elif not isinstance(result, BaseException):
            np.testing.assert_array_equal(result["y"], rows_of(request_id, rows) + 1)
            np.testing.assert_array_equal(result["doubled"], rows_of(request_id, rows) * 2)
        else:
            assert fate == "cancel_late" and isinstance(result, asyncio.CancelledError)
    assert batcher.pending() == 0 and batcher.in_flight() == 0


def test_a_free_running_storm_leaks_nothing(
    gated: GatedRuntime, loop: asyncio.AbstractEventLoop
) -> None:
    loop.run_until_complete(_storm(gated, random.Random(7), 400))


async def _storm(gated: GatedRuntime, rng: random.Random, count: int) -> None:
    batcher = DynamicBatcher(gated)
    gated.executed.clear()
    gated.run += 1
    gated.gate.set()
    sizes: dict[int, int] = {}

    async def one(request_id: int) -> None:
        await asyncio.sleep(rng.random() * 0.05)
        rows = sizes[request_id] = rng.randint(1, 4)
        deadline = time.monotonic() + rng.random() * 0.02 if rng.random() < 0.3 else None
        try:
            result = await batcher.enqueue(request(request_id, rows, gated.run, deadline))
        except (RequestTimeoutError, asyncio.CancelledError):
            return
        np.testing.assert_array_equal(result["y"], rows_of(request_id, rows) + 1)

    tasks = [asyncio.ensure_future(one(i)) for i in range(count)]
    for task in rng.sample(tasks, count // 4):
        loop = asyncio.get_running_loop()
        loop.call_later(rng.random() * 0.06, task.cancel)
    await asyncio.gather(*tasks, return_exceptions=True)
    for task in tasks:
        if not task.cancelled():
            task.result()  # re-raises a wrong answer
    # Cancelled members leave the batcher when their batch's task finishes.
    await until(lambda: batcher.pending() == 0 and batcher.in_flight() == 0, "batcher drained")
    executed = gated.executed
    assert all(executed.count(i) == sizes[i] for i in set(executed))  # nobody ran twice
    assert batcher.pending() == 0 and batcher.in_flight() == 0


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store) as gw:
        yield gw


def _batcher(gw: RunningGateway, model: str) -> DynamicBatcher:
    runtime: object = gw.gateway.manager.version(model, "1").runtime
    while runtime is not None and not isinstance(runtime, DynamicBatcher):
        runtime = getattr(runtime, "inner", None) or getattr(runtime, "_inner", None)
    assert isinstance(runtime, DynamicBatcher)
    return runtime


def test_client_deadlines_and_cancellations_over_grpc(gateway: RunningGateway) -> None:
    rng = random.Random(11)

    async def storm() -> dict[str, int]:
        codes: dict[str, int] = {}
        async with grpc.aio.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)

            async def one(request_id: int) -> None:
                await asyncio.sleep(rng.random() * 0.2)
                rows = rng.randint(1, 4)
                message = pb.ModelInferRequest(model_name="batched", id=str(request_id))
                message.inputs.add(name="x", datatype="FP32", shape=[rows, WIDTH])
                message.raw_input_contents.append(rows_of(request_id, rows).tobytes())
                call = stub.ModelInfer(message, timeout=rng.choice([0.003, 0.01, 0.05, 5]))
                if rng.random() < 0.2:
                    asyncio.get_running_loop().call_later(rng.random() * 0.01, call.cancel)
                try:
                    response = await call
                except (grpc.RpcError, asyncio.CancelledError) as exc:
                    code = exc.code().name if isinstance(exc, grpc.RpcError) else "CANCELLED"
                    codes[code] = codes.get(code, 0) + 1
                    return
                codes["OK"] = codes.get("OK", 0) + 1
                assert response.id == str(request_id)
                y = np.frombuffer(response.raw_output_contents[0], np.float32)
                np.testing.assert_array_equal(y.reshape(rows, WIDTH), rows_of(request_id, rows) + 1)

            await asyncio.gather(*(one(i) for i in range(300)))
        return codes

    codes = asyncio.run(storm())
    assert set(codes) <= {"OK", "DEADLINE_EXCEEDED", "CANCELLED"}, codes
    assert codes.get("OK", 0) > 0

    def idle() -> bool:
        batcher = _batcher(gateway, "batched")
        version = gateway.gateway.manager.version("batched", "1")
        return (batcher.pending() == 0 and batcher.in_flight() == 0 and not version.inflight
                and gateway.gateway.inflight.inflight == 0)

    # Every request was answered or cancelled, so nothing may stay queued, running or leased.
    gateway.call(until(idle, "the batcher, leases and in-flight slots drained", limit_s=10.0))
