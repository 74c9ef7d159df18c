"""Runtime wrappers that trace and measure inference: RequestObserver sits above the batcher
(one request: in-flight, queue wait), ExecutionObserver below it (one executed batch)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.observability.metrics import Metrics, ModelMetrics
from gateway.observability.tracing import (
    ATTR_BATCH_REQUESTS,
    ATTR_BATCH_ROWS,
    ATTR_MODEL,
    ATTR_QUEUE_US,
    ATTR_ROWS,
    ATTR_VERSION,
    Tracing,
)
from gateway.request.context import RequestRecord, record_of
from runtimes.base import InferRequest, Runtime, RuntimeWrapper, Tensor

_W3C: Final = TraceContextTextMapPropagator()


@dataclass(slots=True)
class RequestObservation:
    """One request's timings and span, shared between the two wrappers of a version through
    their Observations (keyed by the request object, which the batcher passes on as is).
    perf_counter seconds for durations; wall-clock nanoseconds for span timestamps."""

    enqueued: float
    enqueued_ns: int
    span: trace.Span | None
    dispatched: float | None = None
    dispatched_ns: int | None = None
    compute_s: float | None = None
    batch_rows: int | None = None


# A version's requests between its RequestObserver and its ExecutionObserver, by id() of
# the InferRequest (alive while the RequestObserver awaits it, so ids are not reused).
Observations = dict[int, RequestObservation]


class _Observer(RuntimeWrapper):
    """What both observers hold: the version's metric children, the tracer (None: tracing
    off), their span name and the observations shared through the batcher."""

    _SPAN: str = ""

    def __init__(
        self, inner: Runtime, metrics: Metrics, tracing: Tracing | None,
        observations: Observations,
    ) -> None:
        super().__init__(inner)
        self._m: ModelMetrics = metrics.model(inner.model)
        self._tracer = tracing.tracer if tracing is not None else None
        self._name = f"{self._SPAN} {inner.model.name}"
        self._observations = observations


class RequestObserver(_Observer):
    """Per request: in-flight and queue-depth gauges, queue and compute histograms, the
    request's 'infer' span with a retroactive 'queue' child, and the RPC record's figures."""

    _SPAN = "infer"

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        if request.warmup is not None:
            return await self.inner.infer(request)
        record = record_of(request)
        if record is not None:
            record.model = self.model
            record.rows = request.rows
        span: trace.Span | None = None
        # A sampled-out RPC gets no child spans at all: that is what 1 % sampling buys.
        if self._tracer is not None and (
            record is None or (record.span is not None and record.span.is_recording())
        ):
            span = self._tracer.start_span(
                self._name, kind=SpanKind.INTERNAL,
                attributes={
                    ATTR_MODEL: self.model.name, ATTR_VERSION: self.model.version,
                    ATTR_ROWS: request.rows,
                },
            )
        obs = RequestObservation(time.perf_counter(), time.time_ns(), span)
        key = id(request)
        self._observations[key] = obs
        m = self._m
        m.in_flight.inc()
        m.queue_depth.inc()
        try:
            if span is None:
                return await self.inner.infer(request)
            with trace.use_span(span, end_on_exit=False, record_exception=True,
                                set_status_on_exception=True):
                return await self.inner.infer(request)
        finally:
            del self._observations[key]
            m.in_flight.dec()
            self._finish(obs, record)

    def _finish(self, obs: RequestObservation, record: RequestRecord | None) -> None:
        m = self._m
        if obs.dispatched is None:
            m.queue_depth.dec()  # left the queue without running: rejected, expired, gone
        else:
            queue_s = obs.dispatched - obs.enqueued
            m.queue_duration.observe(queue_s)
            if obs.compute_s is not None:
                m.compute_duration.observe(obs.compute_s)
            if record is not None:
                record.queue_s = queue_s
                record.compute_s = obs.compute_s
                record.batch_rows = obs.batch_rows
        span = obs.span
        if span is None:
            return
        if span.is_recording():
            end_ns = obs.dispatched_ns if obs.dispatched_ns is not None else time.time_ns()
            queue = self._tracer.start_span(  # type: ignore[union-attr]
                "queue", context=trace.set_span_in_context(span),
                start_time=obs.enqueued_ns,
                attributes={ATTR_QUEUE_US: (end_ns - obs.enqueued_ns) // 1000},
            )
            queue.end(end_time=end_ns)
            span.set_attribute(ATTR_QUEUE_US, (end_ns - obs.enqueued_ns) // 1000)
            if obs.batch_rows is not None:
                span.set_attribute(ATTR_BATCH_ROWS, obs.batch_rows)
        span.end()


def _members(batch: InferRequest, observations: Observations) -> list[RequestObservation]:
    found: list[RequestObservation] = []
    for member in batch.members or (batch,):
        obs = observations.get(id(member))
        if obs is not None:
            found.append(obs)
    return found


class ExecutionObserver(_Observer):
    """Per execution (the merged batch the batcher runs, or one request of a model without
    a batcher): inference and execution counts, batch sizes, and a 'batch' span linked to
    the span of every member request (and each of those linked back to it)."""

    _SPAN = "batch"

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        members = _members(request, self._observations)
        if not members and request.warmup is not None:
            return await self.inner.infer(request)
        start = time.perf_counter()
        start_ns = time.time_ns()
        for obs in members:
            obs.dispatched = start
            obs.dispatched_ns = start_ns
            obs.batch_rows = request.rows
        self._m.queue_depth.dec(len(members))
        span = None
        if self._tracer is not None and (
            not members or any(o.span is not None for o in members)
        ):
            span = self._start_span(request, members)
        try:
            if span is None:
                outputs = await self.inner.infer(request)
            else:
                if span.get_span_context().is_valid:
                    # A remote runtime (Triton) sends these upstream: its spans join ours.
                    headers: dict[str, str] = {}
                    _W3C.inject(headers, context=trace.set_span_in_context(span))
                    request.trace_headers = headers
                with trace.use_span(span, end_on_exit=False, record_exception=True,
                                    set_status_on_exception=True):
                    outputs = await self.inner.infer(request)
        finally:
            compute = time.perf_counter() - start
            for obs in members:
                obs.compute_s = compute
            if span is not None:
                self._link_back(span, members)
                span.end()
        m = self._m
        m.inference_count.inc(request.rows)
        m.exec_count.inc()
        m.batch_size.observe(request.rows)
        return outputs

    def _start_span(
        self, request: InferRequest, members: list[RequestObservation]
    ) -> trace.Span:
        spans = [o.span for o in members if o.span is not None]
        # The batch joins the trace of its first sampled member (so it is sampled when any
        # member is, and costs nothing when none is); links name every member.
        parent = next((s for s in spans if s.get_span_context().trace_flags.sampled), None)
        if parent is None and spans:
            parent = spans[0]
        context = trace.set_span_in_context(parent) if parent is not None else Context()
        links = [Link(s.get_span_context()) for s in spans if s.get_span_context().is_valid]
        return self._tracer.start_span(  # type: ignore[union-attr]
            self._name, context=context, kind=SpanKind.INTERNAL, links=links,
            attributes={
                ATTR_MODEL: self.model.name, ATTR_VERSION: self.model.version,
                ATTR_BATCH_ROWS: request.rows, ATTR_BATCH_REQUESTS: max(1, len(members)),
            },
        )

    @staticmethod
    def _link_back(span: trace.Span, members: list[RequestObservation]) -> None:
        context = span.get_span_context()
        if not context.is_valid:
            return
        for obs in members:
            if obs.span is not None and obs.span.is_recording():
                obs.span.add_link(context)
