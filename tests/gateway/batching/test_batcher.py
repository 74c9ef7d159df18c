"""Unit tests of the dynamic batcher's scheduling with a fake runtime and a fake clock:
every step is driven explicitly (advance the clock, release held calls, await futures)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import numpy as np
import pytest

from gateway.batching.batcher import RETRY_AFTER_KEY, DynamicBatcher
from gateway.errors import InvalidRequestError, OverloadedError, RequestTimeoutError
from model_store.datatypes import DataType
from model_store.spec import (
    DynamicBatchingSpec,
    ModelSpec,
    QueuePolicy,
    TensorSpec,
    TimeoutAction,
)
from runtimes.base import InferRequest, Tensor
from runtimes.errors import InferenceFailed, InvalidTensorError, RuntimeClosedError
from tests.support.fake_runtime import FakeClock, FakeRuntime

pytestmark = pytest.mark.timeout(30)


def make_spec(
    *,
    max_batch_size: int = 8,
    preferred: Sequence[int] = (),
    delay_us: int = 1000,
    instances: int = 1,
    policy: QueuePolicy | None = None,
    levels: int = 0,
    default_level: int = 0,
    per_level: Mapping[int, QueuePolicy] | None = None,
) -> ModelSpec:
    return ModelSpec(
        name="m",
        platform="onnxruntime_onnx",
        backend="",
        max_batch_size=max_batch_size,
        inputs=(TensorSpec("x", DataType.FP32, (-1,)),),
        outputs=(TensorSpec("y", DataType.FP32, (-1,)), TensorSpec("z", DataType.FP32, (-1,))),
        instance_count=instances,
        dynamic_batching=DynamicBatchingSpec(
            preferred_batch_sizes=tuple(preferred),
            max_queue_delay_us=delay_us,
            default_queue_policy=policy or QueuePolicy(),
            priority_levels=levels,
            default_priority_level=default_level,
            priority_queue_policy=dict(per_level or {}),
        ),
    )


def req(
    rows: int = 1,
    width: int = 2,
    start: float = 0.0,
    outputs: tuple[str, ...] = (),
    **hints: object,
) -> InferRequest:
    data = (start + np.arange(rows * width, dtype=np.float32)).reshape(rows, width)
    return InferRequest(inputs={"x": data}, outputs=outputs, rows=rows, **hints)  # type: ignore[arg-type]


class Harness:
    def __init__(self, spec: ModelSpec, staged: int = 1) -> None:
        self.clock = FakeClock()
        self.runtime = FakeRuntime(spec)
        self.batcher = DynamicBatcher(self.runtime, clock=self.clock, staged=staged)

    def rows_per_call(self) -> list[int]:
        return [c.rows for c in self.runtime.calls]


async def test_dispatches_when_rows_reach_max_batch_size() -> None:
    h = Harness(make_spec(max_batch_size=4))
    first = h.batcher.enqueue(req(rows=2))
    # Dispatch decisions are synchronous: nothing in flight now means nothing will run.
    assert h.batcher.in_flight() == 0 and h.batcher.pending() == 1
    assert h.runtime.calls == []
    second = h.batcher.enqueue(req(rows=2, start=100))
    a, b = await asyncio.gather(first, second)
    assert h.rows_per_call() == [4]
    np.testing.assert_array_equal(a["y"], req(rows=2).inputs["x"])
    np.testing.assert_array_equal(b["z"], req(rows=2, start=100).inputs["x"] * 2)


async def test_dispatches_on_preferred_size_at_once() -> None:
    h = Harness(make_spec(max_batch_size=8, preferred=(4,), delay_us=10_000))
    futures = [h.batcher.enqueue(req(start=i)) for i in range(3)]
    assert h.batcher.in_flight() == 0 and h.batcher.pending() == 3
    assert h.runtime.calls == []
    futures.append(h.batcher.enqueue(req(start=3)))
    await asyncio.gather(*futures)
    assert h.rows_per_call() == [4]


async def test_largest_preferred_size_first_then_rest_after_delay() -> None:
    h = Harness(make_spec(max_batch_size=8, preferred=(2, 4), delay_us=1000))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(rows=2))  # reaches preferred 2: runs at once and holds
    await h.runtime.wait_calls(1)
    futures = [h.batcher.enqueue(req(start=i)) for i in range(6)]
    h.runtime.hold = False
    h.runtime.release()
    await busy
    await h.runtime.wait_calls(2)
    assert h.rows_per_call() == [2, 4]
    # Two rows are left: 2 is a preferred size, so they go at once as well.
    await asyncio.gather(*futures)
    assert h.rows_per_call() == [2, 4, 2]


async def test_dispatches_when_oldest_waited_max_queue_delay() -> None:
    h = Harness(make_spec(max_batch_size=8, preferred=(4,), delay_us=1000))
    future = h.batcher.enqueue(req())
    h.clock.advance(0.0005)
    h.batcher.enqueue(req())
    h.clock.advance(0.0004)
    assert h.batcher.in_flight() == 0 and h.batcher.pending() == 2
    assert h.runtime.calls == []
    h.clock.advance(0.0002)  # the oldest has now waited 1.1 ms
    await future
    assert h.rows_per_call() == [2]


async def test_zero_delay_dispatches_whatever_is_pending() -> None:
    h = Harness(make_spec(max_batch_size=8, preferred=(4,), delay_us=0))
    await h.batcher.enqueue(req())
    assert h.rows_per_call() == [1]


async def test_request_that_cannot_fit_closes_the_batch() -> None:
    h = Harness(make_spec(max_batch_size=4, delay_us=1_000_000))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(rows=4))
    await h.runtime.wait_calls(1)
    futures = [h.batcher.enqueue(req(rows=3)), h.batcher.enqueue(req(rows=2))]
    h.runtime.hold = False
    h.runtime.release()
    await busy
    await futures[0]
    # 3 + 2 > 4: the 3 rows go alone without waiting for the (long) delay.
    assert h.rows_per_call() == [4, 3]
    assert h.batcher.pending() == 1


async def test_only_equal_non_batch_shapes_share_a_batch() -> None:
    h = Harness(make_spec(max_batch_size=8, delay_us=1000))
    narrow = [h.batcher.enqueue(req(width=2, start=i)) for i in range(2)]
    wide = h.batcher.enqueue(req(width=3, start=50))
    narrow.append(h.batcher.enqueue(req(width=2, start=9)))
    h.clock.advance(0.002)
    results = await asyncio.gather(*narrow, wide)
    shapes = sorted((c.rows, c.inputs["x"].shape[1]) for c in h.runtime.calls)
    assert shapes == [(1, 3), (3, 2)]
    for index, start in enumerate((0, 1, 9)):
        np.testing.assert_array_equal(results[index]["y"], req(width=2, start=start).inputs["x"])
    np.testing.assert_array_equal(results[3]["y"], req(width=3, start=50).inputs["x"])


async def test_priority_levels_order_the_batch() -> None:
    policy = QueuePolicy()
    h = Harness(make_spec(max_batch_size=1, levels=2, default_level=2, policy=policy))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(start=0))
    await h.runtime.wait_calls(1)
    low = h.batcher.enqueue(req(start=10, priority=2))
    default = h.batcher.enqueue(req(start=20))  # priority 0 = default level 2
    high = h.batcher.enqueue(req(start=30, priority=1))
    h.runtime.hold = False
    h.runtime.release()
    await asyncio.gather(busy, low, default, high)
    firsts = [float(c.inputs["x"][0, 0]) for c in h.runtime.calls]
    assert firsts == [0.0, 30.0, 10.0, 20.0]


async def test_priority_outside_levels_is_invalid() -> None:
    h = Harness(make_spec(levels=2, default_level=1))
    with pytest.raises(InvalidRequestError, match="priority 3"):
        h.batcher.enqueue(req(priority=3))
    # Without priority levels there is one queue and the priority has nothing to choose.
    plain = Harness(make_spec(delay_us=0))
    await plain.batcher.enqueue(req(priority=7))


async def test_full_queue_rejects_at_once_with_retry_hint() -> None:
    h = Harness(make_spec(max_batch_size=1, policy=QueuePolicy(max_queue_size=2)))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req())
    await h.runtime.wait_calls(1)
    queued = [h.batcher.enqueue(req()), h.batcher.enqueue(req())]
    with pytest.raises(OverloadedError) as info:
        h.batcher.enqueue(req())
    assert int(info.value.trailers[RETRY_AFTER_KEY]) >= 1
    h.runtime.hold = False
    h.runtime.release()
    await asyncio.gather(busy, *queued)
    assert len(h.runtime.calls) == 3


async def test_per_level_queue_policy() -> None:
    h = Harness(
        make_spec(
            max_batch_size=1,
            levels=2,
            default_level=2,
            per_level={1: QueuePolicy(max_queue_size=1)},
        )
    )
    h.runtime.hold = True
    h.batcher.enqueue(req())
    await h.runtime.wait_calls(1)
    h.batcher.enqueue(req(priority=1))
    with pytest.raises(OverloadedError):
        h.batcher.enqueue(req(priority=1))
    h.batcher.enqueue(req(priority=2))  # level 2 has no limit
    assert h.batcher.pending() == 2
    h.runtime.hold = False
    h.runtime.release()


async def test_timeout_reject_answers_and_never_runs() -> None:
    policy = QueuePolicy(default_timeout_us=1000, timeout_action=TimeoutAction.REJECT)
    h = Harness(make_spec(max_batch_size=1, policy=policy))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(start=0))
    await h.runtime.wait_calls(1)
    late = h.batcher.enqueue(req(start=5))
    h.clock.advance(0.0011)
    with pytest.raises(RequestTimeoutError, match="timeout expired"):
        await late
    h.runtime.hold = False
    h.runtime.release()
    await busy
    assert h.batcher.pending() == 0  # nothing left that could still run
    assert len(h.runtime.calls) == 1


async def test_timeout_override_only_shortens_when_allowed() -> None:
    allowed = QueuePolicy(default_timeout_us=10_000, allow_timeout_override=True)
    h = Harness(make_spec(max_batch_size=1, policy=allowed))
    h.runtime.hold = True
    h.batcher.enqueue(req())
    await h.runtime.wait_calls(1)
    short = h.batcher.enqueue(req(timeout_us=500))
    longer = h.batcher.enqueue(req(timeout_us=50_000))
    h.clock.advance(0.0006)
    assert short.done() and isinstance(short.exception(), RequestTimeoutError)
    assert not longer.done()
    h.clock.advance(0.0100)  # the default 10 ms applies: the request cannot lengthen it
    assert longer.done() and isinstance(longer.exception(), RequestTimeoutError)

    fixed = Harness(make_spec(max_batch_size=1, policy=QueuePolicy(default_timeout_us=10_000)))
    fixed.runtime.hold = True
    fixed.batcher.enqueue(req())
    await fixed.runtime.wait_calls(1)
    ignored = fixed.batcher.enqueue(req(timeout_us=500))
    fixed.clock.advance(0.001)
    assert not ignored.done()
    fixed.runtime.hold = False
    fixed.runtime.release()
    h.runtime.release()


async def test_timeout_delay_moves_request_behind_the_others() -> None:
    policy = QueuePolicy(allow_timeout_override=True, timeout_action=TimeoutAction.DELAY)
    h = Harness(make_spec(max_batch_size=1, policy=policy))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(start=0))
    await h.runtime.wait_calls(1)
    delayed = h.batcher.enqueue(req(start=1, timeout_us=500))
    other = h.batcher.enqueue(req(start=2))
    h.clock.advance(0.001)
    assert not delayed.done()
    h.runtime.hold = False
    h.runtime.release()
    await asyncio.gather(busy, delayed, other)
    firsts = [float(c.inputs["x"][0, 0]) for c in h.runtime.calls]
    assert firsts == [0.0, 2.0, 1.0]


async def test_deadline_expiry_in_queue_never_runs() -> None:
    h = Harness(make_spec(max_batch_size=1))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(start=0))
    await h.runtime.wait_calls(1)
    doomed = h.batcher.enqueue(req(start=7, deadline=h.clock.now() + 0.002))
    h.clock.advance(0.0021)
    with pytest.raises(RequestTimeoutError, match="deadline"):
        await doomed
    with pytest.raises(RequestTimeoutError):
        h.batcher.enqueue(req(deadline=h.clock.now()))
    h.runtime.hold = False
    h.runtime.release()
    await busy
    assert h.batcher.pending() == 0  # nothing left that could still run
    assert [float(c.inputs["x"][0, 0]) for c in h.runtime.calls] == [0.0]


async def test_cancelled_caller_leaves_queue_and_never_runs() -> None:
    h = Harness(make_spec(max_batch_size=2, delay_us=1000))
    h.runtime.hold = True
    busy = h.batcher.enqueue(req(rows=2, start=0))
    await h.runtime.wait_calls(1)
    task = asyncio.create_task(h.batcher.infer(req(start=100)))
    kept = h.batcher.enqueue(req(start=200))
    await asyncio.sleep(0)  # the task queues its request
    assert h.batcher.pending() == 2
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert h.batcher.pending() == 1
    h.runtime.hold = False
    h.runtime.release()
    h.clock.advance(0.002)
    await asyncio.gather(busy, kept)
    starts = [float(c.inputs["x"][0, 0]) for c in h.runtime.calls]
    assert starts == [0.0, 200.0]
    assert h.rows_per_call() == [2, 1]


async def test_each_request_gets_only_its_requested_outputs() -> None:
    h = Harness(make_spec(max_batch_size=3, delay_us=1000))
    only_y = h.batcher.enqueue(req(start=0, outputs=("y",)))
    only_z = h.batcher.enqueue(req(start=10, outputs=("z",)))
    both = h.batcher.enqueue(req(start=20))
    a, b, c = await asyncio.gather(only_y, only_z, both)
    assert h.runtime.calls[0].outputs == ()  # one member wants every output
    assert set(a) == {"y"} and set(b) == {"z"} and set(c) == {"y", "z"}
    np.testing.assert_array_equal(b["z"], req(start=10).inputs["x"] * 2)

    h2 = Harness(make_spec(max_batch_size=2, delay_us=1000))
    first, second = h2.batcher.enqueue(req(outputs=("z",))), h2.batcher.enqueue(req(outputs=("z",)))
    await asyncio.gather(first, second)
    assert h2.runtime.calls[0].outputs == ("z",)


async def test_failing_batch_fails_only_its_members() -> None:
    h = Harness(make_spec(max_batch_size=2, delay_us=1000))
    h.runtime.fail_next = InferenceFailed("onnxruntime failed: boom")
    members = [h.batcher.enqueue(req()), h.batcher.enqueue(req())]
    outcomes = await asyncio.gather(*members, return_exceptions=True)
    assert all(isinstance(o, InferenceFailed) and "boom" in str(o) for o in outcomes)
    after = [h.batcher.enqueue(req(start=3)), h.batcher.enqueue(req(start=4))]
    results: list[dict[str, Tensor]] = await asyncio.gather(*after)
    np.testing.assert_array_equal(results[1]["y"], req(start=4).inputs["x"])


async def test_never_more_batches_in_flight_than_instances() -> None:
    h = Harness(make_spec(max_batch_size=1, instances=2))
    h.runtime.hold = True
    futures = [h.batcher.enqueue(req(start=i)) for i in range(5)]
    await h.runtime.wait_calls(2)
    # Both instances busy and three waiting: no third batch can be dispatched until one ends.
    assert h.batcher.in_flight() == 2 and h.batcher.pending() == 3
    assert len(h.runtime.calls) == 2
    h.runtime.release(1)
    await h.runtime.wait_calls(3)
    assert h.batcher.in_flight() == 2 and h.batcher.pending() == 2
    assert len(h.runtime.calls) == 3
    h.runtime.hold = False
    h.runtime.release()
    await asyncio.gather(*futures)
    assert h.runtime.max_running == 2


async def test_staged_batches_hand_the_next_batch_over_while_one_runs() -> None:
    # staged=2 with one instance: a second batch is formed and handed to the runtime while
    # the first is held, and a third waits in the queue; each is a full batch of its own.
    h = Harness(make_spec(max_batch_size=2, delay_us=1000), staged=2)
    h.runtime.hold = True
    futures = [h.batcher.enqueue(req(start=i)) for i in range(6)]
    await h.runtime.wait_calls(2)
    assert h.batcher.in_flight() == 2 and h.batcher.pending() == 2
    assert h.rows_per_call() == [2, 2]
    h.runtime.release(1)
    await h.runtime.wait_calls(3)
    assert h.batcher.in_flight() == 2 and h.batcher.pending() == 0
    assert h.rows_per_call() == [2, 2, 2]
    h.runtime.hold = False
    h.runtime.release()
    answers = await asyncio.gather(*futures)
    for i, answer in enumerate(answers):  # each caller gets its own row back
        np.testing.assert_array_equal(answer["y"], req(start=i).inputs["x"])
    with pytest.raises(ValueError, match="staged"):
        DynamicBatcher(FakeRuntime(make_spec()), staged=0)


async def test_rows_beyond_max_batch_size_are_invalid() -> None:
    h = Harness(make_spec(max_batch_size=4))
    with pytest.raises(InvalidRequestError, match="max_batch_size"):
        h.batcher.enqueue(req(rows=5))


async def test_unload_finishes_queued_requests_then_unloads_inner() -> None:
    h = Harness(make_spec(max_batch_size=8, delay_us=1_000_000))
    queued = [h.batcher.enqueue(req(start=i)) for i in range(3)]
    assert h.batcher.in_flight() == 0 and h.batcher.pending() == 3
    assert h.runtime.calls == []
    await h.batcher.unload()
    assert all(f.done() and f.exception() is None for f in queued)
    assert h.rows_per_call() == [3]
    assert h.runtime.unloaded
    with pytest.raises(RuntimeClosedError):
        h.batcher.enqueue(req())


async def test_warmup_runs_at_once_and_members_reach_the_runtime() -> None:
    h = Harness(make_spec(max_batch_size=8, preferred=(4,), delay_us=1_000_000))
    await h.batcher.enqueue(req(warmup="zeros"))
    assert h.rows_per_call() == [1]
    first = h.batcher.enqueue(req(context={"trace": "a"}))
    second = h.batcher.enqueue(req(context={"trace": "b"}))
    h.clock.advance(1.5)
    await asyncio.gather(first, second)
    assert [m.context for m in h.runtime.calls[1].members] == [{"trace": "a"}, {"trace": "b"}]


async def test_data_the_runtime_rejects_fails_only_that_member() -> None:
    h = Harness(make_spec(max_batch_size=3, delay_us=1000))

    def no_negatives(request: InferRequest) -> Exception | None:
        bad = bool((np.asarray(request.inputs["x"], dtype=np.float32) < 0).any())
        return InvalidTensorError("input 'x': negative values") if bad else None

    h.runtime.check = no_negatives
    futures = [h.batcher.enqueue(req(start=s)) for s in (1.0, -50.0, 3.0)]
    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert isinstance(outcomes[1], InvalidTensorError)
    assert isinstance(outcomes[0], dict) and isinstance(outcomes[2], dict)
    np.testing.assert_array_equal(outcomes[2]["y"], req(start=3.0).inputs["x"])
    assert h.rows_per_call() == [3, 1, 1, 1]
