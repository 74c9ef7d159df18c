"""The dynamic batcher: a Runtime wrapping one model version's runtime with Triton's
dynamic_batching semantics (rows, preferred sizes, queue delay, priority queues, timeouts)."""

from __future__ import annotations

import asyncio
import heapq
import math
import time
from collections import deque

import numpy as np

from gateway.batching.clock import Clock, MonotonicClock, Timer
from gateway.batching.queue import QueuedRequest, ShapeKey, ShapeQueue, shape_key
from gateway.errors import (
    RETRY_AFTER_KEY,
    InvalidRequestError,
    OverloadedError,
    RequestTimeoutError,
)
from gateway.observability.statistics import ModelStatistics, is_warmup
from model_store.spec import DynamicBatchingSpec, QueuePolicy, TensorSpec, TimeoutAction
from runtimes.base import InferRequest, Runtime, RuntimeWrapper, Tensor
from runtimes.errors import InferenceFailed, InvalidTensorError, RuntimeClosedError


class DynamicBatcher(RuntimeWrapper):
    """Queues requests, merges those of equal non-batch shape into batches by rows, hands
    at most ``staged`` batches per instance to ``inner`` at once and splits the outputs
    back.

    Scheduling is event driven: every arrival, completion, withdrawal and timer calls
    ``poll``, which expires requests and dispatches every batch that is due."""

    def __init__(
        self,
        inner: Runtime,
        statistics: ModelStatistics | None = None,
        clock: Clock | None = None,
        staged: int = 1,
    ) -> None:
        """``staged``: batches handed to each instance at once. 1 is Triton's rule: the next
        batch is formed when an instance frees. With 2 it is formed while one runs and
        waits in the runtime's own queue, so the instance starts it the moment the last
        one ends instead of waiting for the event loop to hand it over (which, under load,
        left ONNX Runtime idle about half of the time); batches may then be smaller."""
        if staged < 1:
            raise ValueError(f"staged must be at least 1, not {staged}")
        config = inner.spec.dynamic_batching
        if config is None or inner.spec.max_batch_size <= 0:
            raise ValueError("DynamicBatcher needs a model with dynamic_batching and batching")
        super().__init__(inner)
        self._config: DynamicBatchingSpec = config
        self._statistics = statistics
        self._clock: Clock = clock or MonotonicClock()
        self._instances = max(1, self.spec.instance_count)
        self._depth = self._instances * staged
        self._max_rows = self.spec.max_batch_size
        preferred = sorted({p for p in config.preferred_batch_sizes if 0 < p <= self._max_rows})
        self._preferred = frozenset(preferred)
        self._max_preferred = preferred[-1] if preferred else self._max_rows
        self._delay = config.max_queue_delay_us / 1e6
        self._groups: dict[ShapeKey, ShapeQueue] = {}
        self._level_counts: dict[int, int] = {}
        self._expiries: list[tuple[float, int, str, QueuedRequest]] = []
        self._seq = 0
        self._in_flight = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: Timer | None = None
        self._timer_at: float | None = None
        self._closing = False
        self._idle: asyncio.Event | None = None
        self._batch_seconds = 0.0  # moving average, for retry hints

    # -- Runtime interface -------------------------------------------------------------

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        entry = self._enqueue(request)
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The caller went away (its task was cancelled, and so was the future): the
            # request leaves the queue now and never runs.
            self._on_done(entry)
            raise

    async def unload(self) -> None:
        """Take no new requests, run every queued one without waiting for the delay, wait
        for the batches in flight, then unload the inner runtime."""
        self._closing = True
        self.poll()
        if self.pending() or self._in_flight:
            self._idle = asyncio.Event()
            await self._idle.wait()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if isinstance(self._clock, MonotonicClock):
            self._clock.close()
        await self.inner.unload()

    # -- queueing ----------------------------------------------------------------------

    def enqueue(self, request: InferRequest) -> asyncio.Future[dict[str, Tensor]]:
        """Queue a request and return the future of its outputs. Raises at once when the
        request cannot be queued (closed, invalid priority or size, queue full, expired).
        Cancelling the future withdraws the request."""
        entry = self._enqueue(request)
        entry.future.add_done_callback(lambda _: self._on_done(entry))
        return entry.future

    def _enqueue(self, request: InferRequest) -> QueuedRequest:
        if self._closing:
            raise RuntimeClosedError(f"model {self.model} is unloading")
        if not 1 <= request.rows <= self._max_rows:
            raise InvalidRequestError(
                f"batch size {request.rows} is outside 1..max_batch_size ({self._max_rows})"
            )
        level = self._level_of(request.priority)
        policy = self._config.queue_policy(level)
        waiting = self._level_counts.get(level, 0)
        if policy.max_queue_size and waiting >= policy.max_queue_size:
            raise OverloadedError(
                f"the queue of model {self.model} is full ({policy.max_queue_size} requests"
                f"{f' at priority {level}' if self._config.priority_levels else ''})",
                trailers={RETRY_AFTER_KEY: str(self._retry_after_ms(waiting))},
            )
        now = self._clock.now()
        if request.deadline is not None and request.deadline <= now:
            raise RequestTimeoutError("the request's deadline passed before it was queued")
        future: asyncio.Future[dict[str, Tensor]] = asyncio.get_running_loop().create_future()
        self._seq += 1
        entry = QueuedRequest(request, future, level, shape_key(request), self._seq, now)
        group = self._groups.get(entry.key)
        if group is None:
            group = self._groups[entry.key] = ShapeQueue()
        queue = group.queued.get(level)
        if queue is None:
            queue = group.queued[level] = deque()
        queue.append(entry)
        self._level_counts[level] = waiting + 1
        timeout = _queue_timeout_us(policy, request.timeout_us)
        if timeout:
            heapq.heappush(self._expiries, (now + timeout / 1e6, entry.seq, "timeout", entry))
        if request.deadline is not None:
            heapq.heappush(self._expiries, (request.deadline, entry.seq, "deadline", entry))
        self.poll()
        return entry

    def pending(self) -> int:
        """How many requests wait in the queues."""
        return sum(self._level_counts.values())

    def in_flight(self) -> int:
        """How many batches run now."""
        return self._in_flight

    def _level_of(self, priority: int) -> int:
        levels = self._config.priority_levels
        if not levels:
            return 0  # one queue: without priority levels a priority has nothing to choose
        if priority == 0:
            return self._config.default_priority_level
        if not 1 <= priority <= levels:
            raise InvalidRequestError(
                f"priority {priority} is outside 1..{levels} (the model's priority_levels)"
            )
        return priority

    def _remove(self, entry: QueuedRequest, state: str) -> None:
        if entry.state in ("queued", "delayed"):
            self._level_counts[entry.level] -= 1
        entry.state = state

    def _on_done(self, entry: QueuedRequest) -> None:
        # A caller that went away leaves the queue now, so it can never be dispatched.
        if entry.future.cancelled() and entry.state in ("queued", "delayed"):
            self._remove(entry, "gone")
            self.poll()

    def _retry_after_ms(self, waiting: int) -> int:
        per_batch = self._batch_seconds or max(self._delay, 0.001)
        batches = waiting / self._max_rows + 1
        return max(1, math.ceil(1000 * per_batch * batches / self._instances))

    # -- scheduling --------------------------------------------------------------------

    def poll(self) -> None:
        """Expire what is due, dispatch every batch that is due while an instance is free,
        and set the timer for the next time something becomes due."""
        now = self._clock.now()
        self._expire(now)
        wake: float | None = None
        while self._in_flight < self._depth:
            batch, wake = self._next_batch(now)
            if batch is None:
                break
            self._dispatch(batch, now)
        if self._expiries:
            wake = self._expiries[0][0] if wake is None else min(wake, self._expiries[0][0])
        self._arm(wake)
        if self._idle is not None and not self.pending() and not self._in_flight:
            self._idle.set()

    def _expire(self, now: float) -> None:
        # Requests that left the queue stay in the heap until due; drop them in bulk when
        # they outnumber the waiting ones, so finished requests are not kept alive.
        if len(self._expiries) > 64 and len(self._expiries) > 4 * self.pending():
            self._expiries = [item for item in self._expiries if item[3].waiting]
            heapq.heapify(self._expiries)
        while self._expiries and (self._expiries[0][0] <= now or not self._expiries[0][3].waiting):
            _, _, kind, entry = heapq.heappop(self._expiries)
            if not entry.waiting:
                continue
            if kind == "deadline":
                self._remove(entry, "gone")
                entry.future.set_exception(
                    RequestTimeoutError("the request's deadline passed while it was queued")
                )
                continue
            policy = self._config.queue_policy(entry.level)
            if policy.timeout_action is TimeoutAction.DELAY:
                if entry.state == "queued":
                    entry.state = "delayed"
                    group = self._groups[entry.key]
                    group.delayed.setdefault(entry.level, deque()).append(entry)
                continue
            self._remove(entry, "gone")
            entry.future.set_exception(
                RequestTimeoutError("request timeout expired while queued (timeout_action REJECT)")
            )

    def _next_batch(self, now: float) -> tuple[list[QueuedRequest] | None, float | None]:
        """The first due batch, groups taken in the order of their first request; else
        None and the earliest time a group's queue delay runs out."""
        wake: float | None = None
        for key in list(self._groups):
            if self._groups[key].prune():
                del self._groups[key]
        for group in sorted(self._groups.values(), key=ShapeQueue.head):
            batch, due = self._plan(group, now)
            if batch is not None:
                return batch, None
            if due is not None:
                wake = due if wake is None else min(wake, due)
        return None, wake

    def _plan(
        self, group: ShapeQueue, now: float
    ) -> tuple[list[QueuedRequest] | None, float | None]:
        """Triton's rule for one shape group: the batch to send now, or when to look again."""
        chosen: list[QueuedRequest] = []
        rows = 0
        best = 0  # entries in the best batch found (a preferred size, or full)
        full = False
        for entry in group.ordered():
            size = entry.request.rows
            if chosen:
                if rows + size > self._max_preferred and not best:
                    best = len(chosen)  # no preferred size can be hit any more
                if rows + size > self._max_rows:
                    full = True
                    break
            chosen.append(entry)
            rows += size
            if rows in self._preferred:
                best = len(chosen)
        if not chosen:
            return None, None
        # Warm-up runs before the version takes traffic: nothing could join it, so go now.
        if self._closing or any(is_warmup(e.request) for e in chosen):
            return chosen, None
        due = group.oldest() + self._delay
        # Compared with the very time the timer is armed for, so a timer never fires early.
        expired = self._delay > 0 and now >= due
        if best and not expired:
            return chosen[:best], None
        if full or rows >= self._max_preferred or expired or self._delay == 0:
            return chosen, None
        return None, due

    def _arm(self, wake: float | None) -> None:
        if wake == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = wake
        if wake is not None:
            self._timer = self._clock.call_at(wake, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self.poll()

    def _dispatch(self, batch: list[QueuedRequest], now: float) -> None:
        for entry in batch:
            self._remove(entry, "running")
        self._in_flight += 1
        task = asyncio.get_running_loop().create_task(self._execute(batch, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _execute(self, batch: list[QueuedRequest], dispatched: float) -> None:
        try:
            try:
                await self._run(batch, dispatched)
            except InvalidTensorError:
                if len(batch) == 1:
                    raise
                # One member's data the runtime cannot take (it passed the signature check):
                # run each member alone so that only the culprit gets the error.
                for entry in batch:
                    try:
                        await self._run([entry], dispatched)
                    except Exception as exc:
                        _fail([entry], exc)
        except Exception as exc:
            _fail(batch, exc)
        except BaseException:
            for entry in batch:
                entry.future.cancel()
            raise
        finally:
            self._in_flight -= 1
            self.poll()

    async def _run(self, batch: list[QueuedRequest], dispatched: float) -> None:
        """Run one batch and answer its members; raises what the runtime raised."""
        start = time.perf_counter_ns()
        request = _merge([e.request for e in batch], self.spec.outputs)
        merged = time.perf_counter_ns()
        outputs = await self.inner.infer(request)
        ran = time.perf_counter_ns()
        results = _split(batch, outputs, request.rows)
        done = time.perf_counter_ns()
        elapsed = (done - start) / 1e9
        self._batch_seconds = (
            elapsed if not self._batch_seconds else (0.8 * self._batch_seconds + 0.2 * elapsed)
        )
        input_ns, infer_ns, output_ns = merged - start, ran - merged, done - ran
        counted = [e for e in batch if not is_warmup(e.request)]
        if self._statistics is not None and counted:
            rows = sum(e.request.rows for e in counted)
            self._statistics.record_execution(rows, input_ns, infer_ns, output_ns)
        answered = 0
        queued_s = 0.0
        for entry, result in zip(batch, results, strict=True):
            if entry.future.done():
                continue
            entry.future.set_result(result)
            if not is_warmup(entry.request):
                answered += 1
                queued_s += dispatched - entry.enqueued
        if self._statistics is not None and answered:
            self._statistics.record_queued(
                round(queued_s * 1e9), input_ns, infer_ns, output_ns, count=answered
            )


def _fail(batch: list[QueuedRequest], exc: Exception) -> None:
    for entry in batch:
        if not entry.future.done():
            entry.future.set_exception(exc)


def _queue_timeout_us(policy: QueuePolicy, requested: int | None) -> int:
    """The queue timeout of one request (0: none). A request may only shorten it, and only
    where the policy allows overriding (Triton's allow_timeout_override)."""
    timeout = policy.default_timeout_us
    if policy.allow_timeout_override and requested and (not timeout or requested < timeout):
        timeout = requested
    return timeout


def _merge(requests: list[InferRequest], declared: tuple[TensorSpec, ...]) -> InferRequest:
    """One request of every member's rows, asking for the union of their outputs."""
    first = requests[0]
    wanted: tuple[str, ...] = ()
    if all(r.outputs for r in requests):
        names = {name for r in requests for name in r.outputs}
        wanted = tuple(spec.name for spec in declared if spec.name in names)
    # Wrappers below the batcher (tracing, metrics) reach each member through ``members``.
    members = tuple(requests)
    if len(requests) == 1:
        return InferRequest(
            inputs=first.inputs,
            outputs=wanted,
            rows=first.rows,
            trace_headers=first.trace_headers,
            warmup=first.warmup,
            members=members,
            context=first.context,
        )
    inputs = {
        name: np.concatenate([r.inputs[name] for r in requests], axis=0) for name in first.inputs
    }
    return InferRequest(
        inputs=inputs,
        outputs=wanted,
        rows=sum(r.rows for r in requests),
        trace_headers=first.trace_headers,
        members=members,
    )


def _split(
    batch: list[QueuedRequest], outputs: dict[str, Tensor], rows: int
) -> list[dict[str, Tensor]]:
    """Each member's rows of each output it asked for."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise InferenceFailed(
                f"output '{name}' has shape {list(array.shape)}, which does not split into "
                f"the batch's {rows} rows"
            )
    results: list[dict[str, Tensor]] = []
    start = 0
    for entry in batch:
        end = start + entry.request.rows
        names = entry.request.outputs or tuple(outputs)
        results.append({name: outputs[name][start:end] for name in names})
        start = end
    return results
