"""Runtime wrappers that trace and measure inference: RequestObserver sits above the batcher
(one request: in-flight, its 'infer' span, the version's statistics), ExecutionObserver below
it (one executed batch: counts, and each member's queue and compute figures, once per batch
at its end)."""

from __future__ import annotations

import dataclasses
import time
from typing import Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.observability.metrics import Metrics, ModelMetrics
from gateway.observability.statistics import ModelStatistics, StatisticsRuntime
from gateway.observability.tracing import (
    ATTR_BATCH_REQUESTS,
    ATTR_BATCH_ROWS,
    ATTR_MODEL,
    ATTR_QUEUE_US,
    ATTR_ROWS,
    ATTR_VERSION,
    Tracing,
)
from gateway.request.context import RequestContext, observation_of
from gateway.request.observation import Observation
from runtimes.base import InferRequest, Runtime, RuntimeWrapper, Tensor

_W3C: Final = TraceContextTextMapPropagator()


class _Observer(RuntimeWrapper):
    """What both observers hold: the version's metric children, the tracer (None: tracing
    off) and their span name. They share each request's Observation, which the request
    carries through the batcher (``InferRequest.members``)."""

    _SPAN: str = ""

    def __init__(self, inner: Runtime, metrics: Metrics, tracing: Tracing | None) -> None:
        super().__init__(inner)
        self._m: ModelMetrics = metrics.model(inner.model)
        self._tracer = tracing.tracer if tracing is not None else None
        self._name = f"{self._SPAN} {inner.model.name}"


class RequestObserver(StatisticsRuntime):
    """Per request: the in-flight and queue-depth gauges, the request's 'infer' span with a
    retroactive 'queue' child, the model and rows on its observation, and the version's
    statistics (a StatisticsRuntime whose accounting runs around the same await, so a
    request passes one wrapper frame here rather than two)."""

    def __init__(
        self, inner: Runtime, statistics: ModelStatistics, records_executions: bool,
        metrics: Metrics, tracing: Tracing | None,
    ) -> None:
        super().__init__(inner, statistics, records_executions)
        self._m: ModelMetrics = metrics.model(inner.model)
        self._tracer = tracing.tracer if tracing is not None else None
        self._name = f"infer {inner.model.name}"

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        if request.warmup is not None:
            return await self.inner.infer(request)
        observation = observation_of(request)
        bare = observation is None
        if observation is None:
            observation = _attach(request)
        edge_span = observation.span
        observation.model = self.model
        observation.rows = request.rows
        span: trace.Span | None = None
        # A sampled-out request gets no child spans at all: that is what 1 % sampling buys
        # (one observed without an edge, a bare runtime call, is always traced).
        if self._tracer is not None and (
            bare or (edge_span is not None and edge_span.is_recording())
        ):
            span = self._tracer.start_span(
                self._name, kind=SpanKind.INTERNAL,
                attributes={
                    ATTR_MODEL: self.model.name, ATTR_VERSION: self.model.version,
                    ATTR_ROWS: request.rows,
                },
            )
            observation.infer_span = span
            observation.enqueued_ns = time.time_ns()
        observation.enqueued = time.perf_counter()
        m = self._m
        m.in_flight.inc()
        m.queue_depth.inc()
        entered = time.perf_counter_ns()
        ok = False
        try:
            if span is None:
                outputs = await self.inner.infer(request)
            else:
                with trace.use_span(span, end_on_exit=False, record_exception=True,
                                    set_status_on_exception=True):
                    outputs = await self.inner.infer(request)
            ok = True
            return outputs
        finally:
            self.account(request, entered, ok)
            m.in_flight.dec()
            if observation.dispatched is None:
                m.queue_depth.dec()  # left the queue without running: rejected, expired, gone
            if span is not None:
                self._end_span(span, observation)

    def _end_span(self, span: trace.Span, observation: Observation) -> None:
        if span.is_recording():
            end_ns = observation.dispatched_ns or time.time_ns()
            queue_us = (end_ns - observation.enqueued_ns) // 1000
            queue = self._tracer.start_span(  # type: ignore[union-attr]
                "queue", context=trace.set_span_in_context(span),
                start_time=observation.enqueued_ns, attributes={ATTR_QUEUE_US: queue_us},
            )
            queue.end(end_time=end_ns)
            span.set_attribute(ATTR_QUEUE_US, queue_us)
            if observation.batch_rows is not None:
                span.set_attribute(ATTR_BATCH_ROWS, observation.batch_rows)
        span.end()


def _attach(request: InferRequest) -> Observation:
    """An observation for a request that came without one (a bare runtime call, a shadow's
    copy, an unobserved context): carried by the request itself so the ExecutionObserver
    finds it."""
    observation = Observation(method="", start=0.0)
    context = request.context
    request.context = (dataclasses.replace(context, observation=observation)
                       if isinstance(context, RequestContext) else observation)
    return observation


def _members(batch: InferRequest) -> list[Observation]:
    found: list[Observation] = []
    for member in batch.members or (batch,):
        observation = observation_of(member)
        if observation is not None:
            found.append(observation)
    return found


class ExecutionObserver(_Observer):
    """Per execution (the merged batch the batcher runs, or one request of a model without
    a batcher): inference and execution counts, batch sizes, every member's queue and
    compute figures (on its observation and in the histograms, in one pass at the batch's
    end), and a 'batch' span linked to the span of every member request (and each of those
    linked back to it)."""

    _SPAN = "batch"

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        members = _members(request)
        if not members and request.warmup is not None:
            return await self.inner.infer(request)
        start = time.perf_counter()
        traced = False
        for obs in members:
            obs.dispatched = start
            obs.batch_rows = request.rows
            if obs.infer_span is not None:
                traced = True
        m = self._m
        m.queue_depth.dec(len(members))
        span = None
        if self._tracer is not None and (not members or traced):
            start_ns = time.time_ns()
            for obs in members:
                obs.dispatched_ns = start_ns
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
            queue_duration, compute_duration = m.queue_duration, m.compute_duration
            for obs in members:
                queue_s = start - obs.enqueued
                obs.queue_s = queue_s
                obs.compute_s = compute
                queue_duration.observe(queue_s)
                compute_duration.observe(compute)
            if span is not None:
                self._link_back(span, members)
                span.end()
        m.inference_count.inc(request.rows)
        m.exec_count.inc()
        m.batch_size.observe(request.rows)
        return outputs

    def _start_span(
        self, request: InferRequest, members: list[Observation]
    ) -> trace.Span:
        spans = [o.infer_span for o in members if o.infer_span is not None]
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
    def _link_back(span: trace.Span, members: list[Observation]) -> None:
        context = span.get_span_context()
        if not context.is_valid:
            return
        for obs in members:
            member = obs.infer_span
            if member is not None and member.is_recording():
                member.add_link(context)
