"""Where ONNX Runtime runs: short runs on the event loop's own thread (no hand-off), long
ones and every run with inlining off on the worker thread; the answers are the same."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from loadtests.overload import SLOW_WIDTH, slow_model
from model_store.repository import ModelRepository
from model_store.spec import ModelId
from runtimes.base import InferRequest
from runtimes.onnx_runtime import (
    BUSY_SHARE,
    CROWDED_BATCH,
    RELAXED_BATCH,
    OnnxOptions,
    OnnxRuntime,
)
from tests.support import models


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("inline_store")
    models.write_model(root, "tiny", 1, models.add_constant(1.0), models.add_model_config("tiny"))
    # 16 MatMuls of 512x512: milliseconds a batch, far above any inline bound.
    models.write_model(root, "slow", 1, slow_model(layers=16), models.config_pbtxt(
        "slow", [("x", "FP32", [SLOW_WIDTH])], [("y", "FP32", [SLOW_WIDTH])],
        max_batch_size=64))
    return root


class ThreadsUsed(list[str]):
    """The name of the thread each ONNX Runtime run happened on; with ``reported_s`` set,
    each run reports that CPU time instead of its own (run times cannot be had on cue)."""

    reported_s: float | None = None


@pytest.fixture
def threads_used(monkeypatch: pytest.MonkeyPatch) -> Iterator[ThreadsUsed]:
    used = ThreadsUsed()
    import runtimes.onnx_runtime as module

    original = module._timed_run

    def spy(*args: Any) -> Any:
        used.append(threading.current_thread().name)
        results, elapsed, ran = original(*args)
        return results, elapsed if used.reported_s is None else used.reported_s, ran

    monkeypatch.setattr(module, "_timed_run", spy)
    yield used


async def run(store: Path, name: str, options: OnnxOptions, *, rows: int, times: int,
              in_flight: int | None = None) -> list[Any]:
    entry = ModelRepository(store).scan()[name]
    assert entry.spec is not None
    runtime = OnnxRuntime(ModelId(name, 1), entry.spec, entry.version_files[1], options,
                          in_flight=None if in_flight is None else (lambda: in_flight))
    await runtime.load()
    width = entry.spec.inputs[0].dims[0]
    x = np.arange(rows * width, dtype=np.float32).reshape(rows, width) / (rows * width)
    try:
        return [await runtime.infer(InferRequest({"x": x}, rows=rows)) for _ in range(times)]
    finally:
        await runtime.unload()


def test_short_runs_stay_on_the_loop_thread(store: Path, threads_used: ThreadsUsed) -> None:
    outputs = asyncio.run(run(store, "tiny", OnnxOptions(device="cpu", inline_below_us=50_000),
                              rows=2, times=5))
    loop_thread = threading.current_thread().name
    # The first run is measured on the worker; once known to be short, the loop runs them.
    assert threads_used[0] != loop_thread
    assert threads_used[1:] == [loop_thread] * 4
    for answer in outputs:
        np.testing.assert_allclose(answer["y"], outputs[0]["y"])


def test_long_runs_and_inlining_off_use_the_worker(store: Path, threads_used: ThreadsUsed) -> None:
    loop_thread = threading.current_thread().name
    asyncio.run(run(store, "slow", OnnxOptions(device="cpu", inline_below_us=100), rows=8,
                    times=3))
    asyncio.run(run(store, "tiny", OnnxOptions(device="cpu", inline_below_us=0), rows=2,
                    times=3))
    assert len(threads_used) == 6
    assert loop_thread not in threads_used


def test_with_other_requests_in_flight_only_the_shortest_runs_stay_inline(
    store: Path, threads_used: ThreadsUsed
) -> None:
    # Bound 20 ms: alone, runs under it stay on the loop; with others in flight, only runs
    # under a quarter of it (BUSY_SHARE): a longer one is worth the hand-off to a worker,
    # which runs it on another core while the loop serves the rest.
    assert BUSY_SHARE == 0.25
    options = OnnxOptions(device="cpu", inline_below_us=20_000)
    loop_thread = threading.current_thread().name
    threads_used.reported_s = 0.010  # between a quarter of the bound and the bound
    asyncio.run(run(store, "tiny", options, rows=2, times=4, in_flight=3))
    assert len(threads_used) == 4 and loop_thread not in threads_used
    threads_used.clear()
    asyncio.run(run(store, "tiny", options, rows=2, times=4, in_flight=1))  # only its own
    assert threads_used[1:] == [loop_thread] * 3
    threads_used.clear()
    threads_used.reported_s = 0.001  # under a quarter: inline even with others in flight
    asyncio.run(run(store, "tiny", options, rows=2, times=4, in_flight=3))
    assert threads_used[1:] == [loop_thread] * 3


def test_while_batches_are_crowded_every_run_uses_the_worker(
    store: Path, threads_used: ThreadsUsed
) -> None:
    # Batches of 8 requests: once their moving average reaches CROWDED_BATCH, even the
    # shortest run goes to the worker; batches of 1 bring it back to the loop only once the
    # average falls to RELAXED_BATCH, not as soon as it drops below CROWDED_BATCH.
    assert (CROWDED_BATCH, RELAXED_BATCH) == (6.0, 4.0)
    entry = ModelRepository(store).scan()["tiny"]
    assert entry.spec is not None
    threads_used.reported_s = 0.000_001  # far under any bound
    loop_thread = threading.current_thread().name
    width = entry.spec.inputs[0].dims[0]

    def batch(members: int) -> InferRequest:
        row = np.ones((1, width), dtype=np.float32)
        parts = tuple(InferRequest({"x": row}, rows=1) for _ in range(members))
        return InferRequest({"x": np.ones((members, width), dtype=np.float32)},
                            rows=members, members=parts)

    async def scenario() -> list[bool]:
        runtime = OnnxRuntime(ModelId("tiny", 1), entry.spec, entry.version_files[1],
                              OnnxOptions(device="cpu", inline_below_us=50_000))
        await runtime.load()
        try:
            inline = []
            for members in [8] * 20 + [1] * 12:
                before = len(threads_used)
                await runtime.infer(batch(members))
                inline.append(threads_used[before] == loop_thread)
            return inline
        finally:
            await runtime.unload()

    inline = asyncio.run(scenario())
    # The average after n batches of 8 is 8 - 7 * 0.9**n: 6 or more from the 12th run on.
    # The first run is measured on the worker.
    assert inline[:12] == [False] + [True] * 10 + [False]
    assert inline[12:20] == [False] * 8
    # Then batches of 1: the average (7.15) is under 6 from the 2nd of them and 4 or less
    # only from the 7th; the runs go back to the loop only then.
    assert inline[20:26] == [False] * 6 and inline[26:] == [True] * 6


def test_inline_and_worker_runs_answer_alike(store: Path) -> None:
    inline = asyncio.run(run(store, "tiny", OnnxOptions(device="cpu", inline_below_us=50_000),
                             rows=3, times=2))
    worker = asyncio.run(run(store, "tiny", OnnxOptions(device="cpu"), rows=3, times=2))
    for a, b in zip(inline, worker, strict=True):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])


def test_runs_queued_ahead_wait_in_the_pool_one_per_instance(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Four runs handed over at once (as staged batches are) to one instance: they queue in
    # the instance's worker thread, never more than one at a time, each with its own answer.
    import runtimes.onnx_runtime as module

    running, most = [0], [0]
    lock = threading.Lock()
    original = module._timed_run

    def counting(*args: Any) -> Any:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        try:
            return original(*args)
        finally:
            with lock:
                running[0] -= 1

    monkeypatch.setattr(module, "_timed_run", counting)
    entry = ModelRepository(store).scan()["slow"]
    assert entry.spec is not None and entry.spec.instance_count == 1

    async def scenario() -> list[Any]:
        runtime = OnnxRuntime(ModelId("slow", 1), entry.spec, entry.version_files[1],
                              OnnxOptions(device="cpu"))
        await runtime.load()
        try:
            inputs = [np.full((2, SLOW_WIDTH), i, np.float32) for i in range(4)]
            return list(await asyncio.gather(
                *(runtime.infer(InferRequest({"x": x}, rows=2)) for x in inputs)))
        finally:
            await runtime.unload()

    answers = asyncio.run(scenario())
    assert most[0] == 1
    for i, answer in enumerate(answers):  # the identity MatMuls give each its input back
        np.testing.assert_allclose(answer["y"], np.full((2, SLOW_WIDTH), i, np.float32))
