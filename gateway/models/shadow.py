"""Shadow traffic: mirrors a request to another version after the primary answered (from
the primary's lease, which names its model's routing), fire-and-forget, and records the
shadow's latency, errors and agreement with the primary."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
from opentelemetry import trace

from gateway.errors import ModelNotReadyError
from gateway.models.routing import RoutingTable
from gateway.models.served import Lease, ServedVersion, VersionState
from gateway.observability.tracing import ATTR_MODEL, ATTR_VERSION
from gateway.request.observation import Observation
from runtimes.base import InferRequest, Tensor

log = logging.getLogger(__name__)

ShadowRun = Callable[[], Awaitable[dict[str, Tensor]]]
ShadowKey = tuple[str, int, int]  # model, primary version, shadow version
# The tracer and the primary request's span: the shadow's span becomes its child.
TraceParent = tuple[trace.Tracer, trace.Span]
# Whether this request is sampled for its model's shadow (the router's coin).
ShadowDue = Callable[[RoutingTable], bool]
# Told of every shadow answer (the drift monitor compares shadow and primary outputs).
ShadowObserver = Callable[[ServedVersion, InferRequest, Mapping[str, Tensor]], None]

# Shadows beyond this many in flight are skipped: mirroring must never pile up work that
# competes with the callers.
MAX_IN_FLIGHT: Final = 32
SHADOW_TIMEOUT_S: Final = 30.0
# Float outputs agree when they differ by no more than this (absolute).
TOLERANCE: Final = 1e-5


@dataclass(frozen=True, slots=True)
class ShadowResult:
    """One mirrored request's outcome. ``max_abs_diff`` is over float outputs (None when
    there were none or the shadow failed); ``agreed`` is None when the shadow failed."""

    model: str
    primary: int
    shadow: int
    latency_s: float
    error: str | None
    max_abs_diff: float | None
    agreed: bool | None


@dataclass(slots=True)
class ShadowStats:
    """Counters for one (model, primary version, shadow version) pair."""

    mirrored: int = 0
    errors: int = 0
    skipped: int = 0
    agreed: int = 0
    disagreed: int = 0
    latency_s_sum: float = 0.0
    latency_s_max: float = 0.0
    max_abs_diff: float = 0.0
    last_error: str = ""


class ShadowMirror:
    """Runs shadows in background tasks and keeps their counters; readers (metrics, tests)
    take ``stats()`` snapshots or subscribe with ``add_listener``."""

    def __init__(
        self, max_in_flight: int = MAX_IN_FLIGHT, tolerance: float = TOLERANCE, *,
        due: ShadowDue | None = None,
    ) -> None:
        self._max_in_flight = max_in_flight
        self._tolerance = tolerance
        self._due = due
        self._tasks: set[asyncio.Task[None]] = set()
        self._stats: dict[ShadowKey, ShadowStats] = {}
        self._listeners: list[Callable[[ShadowResult], None]] = []
        # Told of every shadow answer; they must not block. A failure counts as the
        # shadow's error.
        self.observers: list[ShadowObserver] = []

    def offer(
        self, lease: Lease, request: InferRequest, outputs: Mapping[str, Tensor],
        observation: Observation | None = None,
    ) -> None:
        """Mirror a request the primary (``lease``) answered to its model's shadow version,
        if the model's routing names one and this request is sampled. Never raises, never
        waits; the shadow's span is a child of ``observation``'s when that request is traced."""
        model = lease.model
        if model is None:
            return
        table = model.routing
        shadow = table.shadow
        primary = lease.version.id
        if (shadow is None or shadow == primary.version or self._due is None
                or not self._due(table)):
            return
        target = model.versions.get(shadow)
        if target is None or target.state is not VersionState.READY:
            self.skip(primary.name, primary.version, shadow)
            return
        copy = InferRequest(
            inputs=request.inputs, outputs=request.outputs, rows=request.rows,
            priority=request.priority, trace_headers=request.trace_headers,
        )
        observers = self.observers

        async def run() -> dict[str, Tensor]:
            runtime = target.runtime
            if target.state is not VersionState.READY or runtime is None:  # it went since
                raise ModelNotReadyError(
                    f"model '{primary.name}' version {shadow} is {target.state.value.lower()}"
                )
            with Lease(target, runtime, model) as shadow_lease:
                answer = await runtime.infer(copy)
                for observer in observers:
                    observer(shadow_lease.version, copy, answer)
                return answer

        parent = (None if observation is None or observation.tracer is None
                  or observation.span is None else (observation.tracer, observation.span))
        self.mirror(primary.name, primary.version, shadow, run, outputs, parent=parent)

    def add_listener(self, listener: Callable[[ShadowResult], None]) -> None:
        """Call ``listener`` with every ShadowResult (on the event loop; it must not block)."""
        self._listeners.append(listener)

    def stats(self) -> dict[ShadowKey, ShadowStats]:
        """A snapshot of every pair's counters."""
        # list() first: metrics scrapes call this from another thread.
        return {key: replace(value) for key, value in list(self._stats.items())}

    def skip(self, model: str, primary: int, shadow: int) -> None:
        """Count a mirror that could not start (shadow not ready, too many in flight)."""
        self._counters((model, primary, shadow)).skipped += 1

    def mirror(
        self, model: str, primary: int, shadow: int, run: ShadowRun,
        primary_outputs: Mapping[str, Tensor], *, parent: TraceParent | None = None,
    ) -> bool:
        """Start ``run`` in the background and compare its answer with ``primary_outputs``.
        Never raises and never waits; returns whether the shadow was started."""
        if len(self._tasks) >= self._max_in_flight:
            self.skip(model, primary, shadow)
            return False
        task = asyncio.get_running_loop().create_task(
            self._traced((model, primary, shadow), run, primary_outputs, parent),
            name=f"shadow-{model}-{shadow}",
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return True

    async def close(self) -> None:
        """Cancel the shadows still running (at shutdown nobody waits for their answer)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _traced(
        self, key: ShadowKey, run: ShadowRun, primary_outputs: Mapping[str, Tensor],
        parent: TraceParent | None,
    ) -> None:
        if parent is None:
            await self._run(key, run, primary_outputs, None)
            return
        tracer, span = parent
        with tracer.start_as_current_span(
            "shadow", context=trace.set_span_in_context(span),
            attributes={ATTR_MODEL: key[0], ATTR_VERSION: key[2],
                        "modelgate.shadow.primary_version": key[1]},
        ) as shadow_span:
            await self._run(key, run, primary_outputs, shadow_span)

    async def _run(
        self, key: ShadowKey, run: ShadowRun, primary_outputs: Mapping[str, Tensor],
        span: trace.Span | None,
    ) -> None:
        started = time.perf_counter()
        error: str | None = None
        outputs: dict[str, Tensor] = {}
        try:
            outputs = await asyncio.wait_for(run(), SHADOW_TIMEOUT_S)
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = f"no answer within {SHADOW_TIMEOUT_S:.0f}s"
        except Exception as exc:  # a shadow's failure is recorded, never propagated
            error = f"{type(exc).__name__}: {exc}"
        latency = time.perf_counter() - started
        diff, agreed = (None, None) if error else compare(primary_outputs, outputs, self._tolerance)
        if span is not None and span.is_recording():
            if error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, error))
            else:
                span.set_attribute("modelgate.shadow.agreed", bool(agreed))
                if diff is not None:
                    span.set_attribute("modelgate.shadow.max_abs_diff", diff)
        self._record(ShadowResult(key[0], key[1], key[2], latency, error, diff, agreed))

    def _counters(self, key: ShadowKey) -> ShadowStats:
        stats = self._stats.get(key)
        if stats is None:
            stats = self._stats[key] = ShadowStats()
        return stats

    def _record(self, result: ShadowResult) -> None:
        stats = self._counters((result.model, result.primary, result.shadow))
        stats.mirrored += 1
        stats.latency_s_sum += result.latency_s
        stats.latency_s_max = max(stats.latency_s_max, result.latency_s)
        if result.error is not None:
            stats.errors += 1
            stats.last_error = result.error
            # The first failure and then every hundredth: a broken shadow must not flood logs.
            if stats.errors % 100 == 1:
                log.warning("shadow %s/%d (mirroring %d) failed (%d so far): %s",
                            result.model, result.shadow, result.primary, stats.errors,
                            result.error)
        elif result.agreed:
            stats.agreed += 1
        else:
            stats.disagreed += 1
        if result.max_abs_diff is not None:
            stats.max_abs_diff = max(stats.max_abs_diff, result.max_abs_diff)
        log.debug("shadow %s/%d vs %d: %.2f ms, error=%s, max_abs_diff=%s, agreed=%s",
                  result.model, result.shadow, result.primary, result.latency_s * 1000,
                  result.error, result.max_abs_diff, result.agreed)
        for listener in self._listeners:
            try:
                listener(result)
            except Exception:
                log.exception("shadow result listener failed")


def compare(
    primary: Mapping[str, Tensor], shadow: Mapping[str, Tensor], tolerance: float = TOLERANCE
) -> tuple[float | None, bool]:
    """(max absolute difference over float outputs, whether every output agrees). Float
    outputs agree within ``tolerance``; others (class labels, strings) must be equal."""
    worst: float | None = None
    agreed = True
    for name, expected in primary.items():
        got = shadow.get(name)
        if got is None or got.shape != expected.shape:
            agreed = False
            continue
        if expected.dtype.kind == "f" and got.dtype.kind == "f":
            if expected.size == 0:
                continue
            diff = float(np.max(np.abs(expected.astype(np.float64) - got.astype(np.float64))))
            if math.isnan(diff):
                diff = math.inf
            worst = diff if worst is None else max(worst, diff)
            agreed = agreed and diff <= tolerance
        else:
            agreed = agreed and bool(np.array_equal(expected, got))
    return worst, agreed
