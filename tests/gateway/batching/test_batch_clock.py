"""The batcher's production clock on real event loops (asyncio's and uvloop's): a timer set
for less than a millisecond ahead calls back once, never before it is due (its timerfd wakes
the loop a little early, the clock waits out the rest), and a lone request in a batcher with
a 500 µs queue delay waits it out with a single timer callback (uvloop's own timers, counting
whole milliseconds, fired dozens of times before such a delay ran out)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Coroutine
from typing import Any

import numpy as np
import pytest
import uvloop

from gateway.batching.batcher import DynamicBatcher
from gateway.batching.clock import MonotonicClock
from model_store.datatypes import DataType
from model_store.spec import DynamicBatchingSpec, ModelSpec, TensorSpec
from runtimes.base import InferRequest
from tests.support.fake_runtime import FakeRuntime

pytestmark = pytest.mark.timeout(60)
LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {
    "asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop,
}


def run(loop: str, coroutine: Coroutine[Any, Any, None]) -> None:
    with asyncio.Runner(loop_factory=LOOPS[loop]) as runner:
        runner.run(coroutine)


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_sub_millisecond_timer_fires_once_and_never_early(loop: str) -> None:
    async def check() -> None:
        clock = MonotonicClock()
        fired: list[float] = []
        done = asyncio.Event()

        def at() -> None:
            fired.append(clock.now())
            done.set()

        when = clock.now() + 0.0003
        clock.call_at(when, at)
        await done.wait()
        # A second, later timer proves the first is not still firing meanwhile.
        again = asyncio.Event()
        clock.call_at(clock.now() + 0.0005, again.set)
        await again.wait()
        assert len(fired) == 1 and fired[0] >= when
        clock.close()

    run(loop, check())


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_cancelled_or_replaced_timer_never_fires(loop: str) -> None:
    async def check() -> None:
        clock = MonotonicClock()
        called: list[str] = []
        done = asyncio.Event()
        clock.call_at(clock.now() + 0.0002, lambda: called.append("cancelled")).cancel()
        clock.call_at(clock.now() + 0.0002, lambda: called.append("replaced"))
        clock.call_at(clock.now() + 0.0006, done.set)
        await done.wait()
        assert called == []
        # A time already past fires at once rather than never.
        past = asyncio.Event()
        clock.call_at(clock.now() - 1.0, past.set)
        await past.wait()
        clock.close()

    run(loop, check())


def test_close_releases_the_descriptor_and_a_later_timer_makes_a_new_one() -> None:
    async def check() -> None:
        clock = MonotonicClock()
        first = asyncio.Event()
        clock.call_at(clock.now() + 0.0001, first.set)
        await first.wait()
        fd = clock._fd
        assert fd is not None
        clock.close()
        with pytest.raises(OSError):
            os.fstat(fd)
        second = asyncio.Event()
        clock.call_at(clock.now() + 0.0001, second.set)
        await second.wait()
        clock.close()

    run("uvloop", check())


class _CountingBatcher(DynamicBatcher):
    timer_fires = 0

    def _on_timer(self) -> None:
        self.timer_fires += 1
        super()._on_timer()


@pytest.mark.parametrize("loop", sorted(LOOPS))
def test_a_lone_request_waits_out_a_500_us_delay_with_one_wake_up(loop: str) -> None:
    async def check() -> None:
        spec = ModelSpec(name="m", platform="onnxruntime_onnx", backend="", max_batch_size=8,
                         inputs=(TensorSpec("x", DataType.FP32, (2,)),),
                         outputs=(TensorSpec("y", DataType.FP32, (2,)),),
                         dynamic_batching=DynamicBatchingSpec(max_queue_delay_us=500))
        runtime = FakeRuntime(spec)
        batcher = _CountingBatcher(runtime)
        clock = MonotonicClock()
        for _ in range(5):
            queued = clock.now()
            await batcher.infer(InferRequest(inputs={"x": np.ones((1, 2), np.float32)}))
            # Triton's rule: alone, it waited for the whole delay before it ran.
            assert clock.now() - queued >= 0.0005
        assert batcher.timer_fires == 5 and len(runtime.calls) == 5
        await batcher.unload()

    run(loop, check())
