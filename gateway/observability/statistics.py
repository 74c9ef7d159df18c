"""Per model version inference statistics with Triton's meaning (success/fail, queue and
compute durations, inference vs execution counts, per-batch-size stats) and their recorder."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gateway.request.context import context_of
from model_store.spec import ModelId
from runtimes.base import InferRequest, Runtime, RuntimeWrapper, Tensor


def is_warmup(request: InferRequest) -> bool:
    """Whether the request is the manager's warm-up rather than a client's (not counted)."""
    return request.warmup is not None


@dataclass(slots=True)
class Duration:
    """A count and the total nanoseconds of what it counts."""

    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns) * count


@dataclass(slots=True)
class BatchDurations:
    """Compute durations of every batch of one size (count = batches executed)."""

    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(frozen=True, slots=True)
class StatisticsSnapshot:
    """A consistent copy of one version's statistics, for the ModelStatistics RPC."""

    model: ModelId
    last_inference_ms: int
    inference_count: int
    execution_count: int
    success: Duration
    fail: Duration
    queue: Duration
    compute_input: Duration
    compute_infer: Duration
    compute_output: Duration
    batches: dict[int, BatchDurations]


class ModelStatistics:
    """Counters of one model version. Like Triton: queue and compute durations count each
    successful request (a request in a batch of 8 adds the batch's compute time once for
    itself); inference_count counts rows, execution_count counts batches, and batch stats
    count batches per batch size (rows)."""

    def __init__(self, model: ModelId, wall_clock: Callable[[], float] = time.time) -> None:
        self.model = model
        self._wall_clock = wall_clock
        # The servicer snapshots from the event loop, but runtimes may record from threads.
        self._lock = threading.Lock()
        self._last_inference_ms = 0
        self._inference_count = 0
        self._execution_count = 0
        self._success = Duration()
        self._fail = Duration()
        self._queue = Duration()
        self._compute_input = Duration()
        self._compute_infer = Duration()
        self._compute_output = Duration()
        self._batches: dict[int, BatchDurations] = {}

    def record_request(self, ok: bool, duration_ns: int, prepared_ns: int | None = None) -> None:
        """One request finished: from its arrival at the edge to its runtime stack's answer
        (an answered one's encoding is added by record_encoded). ``prepared_ns``: a batched
        request's time from its arrival to the batcher (decode, checks, admission), counted
        in compute input beside the batch's merge the batcher counts."""
        with self._lock:
            (self._success if ok else self._fail).add(duration_ns)
            if prepared_ns is not None:
                self._compute_input.ns += max(0, prepared_ns)

    def record_encoded(self, ns: int) -> None:
        """A successful request's answer took ``ns`` to encode: compute output, and part of
        its success duration (both already counted it)."""
        with self._lock:
            self._compute_output.ns += max(0, ns)
            self._success.ns += max(0, ns)

    def record_queued(
        self, queue_ns: int, input_ns: int, infer_ns: int, output_ns: int, count: int = 1
    ) -> None:
        """``count`` requests of one successful execution: their total queue wait, and the
        batch's compute, which each of them counts once (as Triton does)."""
        with self._lock:
            self._queue.count += count
            self._queue.ns += max(0, queue_ns)
            self._compute_input.add(input_ns, count)
            self._compute_infer.add(infer_ns, count)
            self._compute_output.add(output_ns, count)

    def record_execution(self, rows: int, input_ns: int, infer_ns: int, output_ns: int) -> None:
        """One successful execution (batch) of ``rows`` rows."""
        with self._lock:
            self._execution_count += 1
            self._inference_count += rows
            self._last_inference_ms = int(self._wall_clock() * 1000)
            batch = self._batches.setdefault(rows, BatchDurations())
            batch.compute_input.add(input_ns)
            batch.compute_infer.add(infer_ns)
            batch.compute_output.add(output_ns)

    def snapshot(self) -> StatisticsSnapshot:
        with self._lock:
            return StatisticsSnapshot(
                model=self.model,
                last_inference_ms=self._last_inference_ms,
                inference_count=self._inference_count,
                execution_count=self._execution_count,
                success=_copy(self._success),
                fail=_copy(self._fail),
                queue=_copy(self._queue),
                compute_input=_copy(self._compute_input),
                compute_infer=_copy(self._compute_infer),
                compute_output=_copy(self._compute_output),
                batches={
                    size: BatchDurations(
                        _copy(b.compute_input), _copy(b.compute_infer), _copy(b.compute_output)
                    )
                    for size, b in sorted(self._batches.items())
                },
            )


def _copy(duration: Duration) -> Duration:
    return Duration(duration.count, duration.ns)


class StatisticsRuntime(RuntimeWrapper):
    """Wraps a runtime to count its requests. With ``records_executions`` every request is
    one execution (a model without a batcher), broken down as Triton does: queue from
    entering the stack to the run's start (waiting for an instance), compute input from the
    request's arrival at the edge (decode, checks, admission), infer the run itself (as the
    runtime reports it in ``ran_ns``), output from its end to the answer; the adapter adds
    the encoding (record_encoded). Otherwise the batcher below records the queue, compute
    and execution figures into the same ModelStatistics."""

    def __init__(
        self, inner: Runtime, statistics: ModelStatistics, records_executions: bool
    ) -> None:
        super().__init__(inner)
        self.statistics = statistics
        self._records_executions = records_executions

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        if request.warmup is not None:
            return await self.inner.infer(request)
        entered = time.perf_counter_ns()
        ok = False
        try:
            outputs = await self.inner.infer(request)
            ok = True
        finally:
            self.account(request, entered, ok)
        return outputs

    def account(self, request: InferRequest, entered: int, ok: bool) -> None:
        """Count one request that entered the stack at ``entered`` (perf_counter ns) and
        has just left it, answered (``ok``) or not; a subclass that wraps more around the
        same await (the request observer) calls it from its own ``infer``."""
        left = time.perf_counter_ns()
        context = context_of(request)
        arrived = min(context.arrived_ns, entered) if context is not None else entered
        statistics = self.statistics
        if not ok or not self._records_executions:
            # A cancelled caller counts as a failure too: the request did not complete.
            statistics.record_request(ok, left - arrived, entered - arrived if ok else None)
            return
        statistics.record_request(ok, left - arrived)
        started, ended = request.ran_ns or (entered, left)
        input_ns, infer_ns, output_ns = entered - arrived, ended - started, left - ended
        statistics.record_queued(started - entered, input_ns, infer_ns, output_ns)
        statistics.record_execution(request.rows, input_ns, infer_ns, output_ns)


def record_encoding(statistics: ModelStatistics | None, started_ns: int) -> None:
    """What an adapter calls once it has encoded an answer it began encoding at
    ``started_ns`` (perf_counter ns), with the statistics of the version that ran."""
    if statistics is not None:
        statistics.record_encoded(time.perf_counter_ns() - started_ns)
