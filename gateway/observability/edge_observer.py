"""Opens and closes every transport's observations: the request's server span, and once it
is answered the Prometheus counts, the quota-rejection count, the span's end and the access-log
line. The transports (gRPC unary, ModelStreamInfer, REST) add only their own span attributes
and status spelling."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode
from opentelemetry.util.types import AttributeValue

from gateway.errors import QuotaExceededError, limit_of
from gateway.observability.access_log import AccessEntry, AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import (
    ATTR_MODEL,
    ATTR_ROWS,
    ATTR_VERSION,
    SAMPLING_MODEL,
    Tracing,
    trace_id_hex,
)
from gateway.request.observation import QUOTA, Observation, Protocol

# The methods whose answers the inference families count (other RPCs of the inference
# service are observed, spanned and logged, not counted).
COUNTED: Final = frozenset({"ModelInfer", "ModelStreamInfer"})
# The semantic conventions' server-side gRPC error codes; the others are the client's doing.
SERVER_ERRORS: Final = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED",
                                  "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

Carrier = Sequence[tuple[str, str | bytes]]
Asked = tuple[str | None, str | None]


class EdgeObserver:
    """The one place a request's observation is opened and closed, for every transport."""

    def __init__(
        self, metrics: Metrics, tracing: Tracing | None, access_log: AccessLog | None
    ) -> None:
        self._metrics = metrics
        self.tracing = tracing
        self.access_log = access_log

    def open(
        self, method: str, protocol: Protocol, carrier: Carrier, span_name: str,
        attributes: dict[str, AttributeValue], *, model: str | None = None,
    ) -> Observation:
        """A request's observation, with its server span (a child of the caller's trace
        context in ``carrier``) unless tracing is off or the request is sampled out before
        any span exists; ``model`` (the one the request names) picks the sampling."""
        observation = Observation(method, time.perf_counter(), protocol)
        tracing = self.tracing
        if tracing is None:
            return observation
        trace_id = tracing.sampled_out_root(carrier, span_name, model)
        if trace_id is not None:
            observation.trace_id = trace_id
            return observation
        if model:
            attributes[SAMPLING_MODEL] = model
        self.start_span(observation, span_name, tracing.extract(carrier), attributes)
        return observation

    def start_span(
        self, observation: Observation, name: str, parent: otel_context.Context,
        attributes: dict[str, AttributeValue], links: Sequence[Link] = (),
    ) -> None:
        """Start the observation's server span and make it current in the calling task (the
        inner steps' spans, auth and quota, become its children)."""
        tracer = self.tracing.tracer  # type: ignore[union-attr]
        span = tracer.start_span(name, context=parent, kind=SpanKind.SERVER,
                                 attributes=attributes, links=links)
        observation.tracer = tracer
        observation.span = span
        observation.trace_id = trace_id_hex(span)
        observation.otel_token = otel_context.attach(trace.set_span_in_context(span, parent))

    def close(
        self, observation: Observation, code: str, error: BaseException | None, peer: str,
        asked: Asked, *, http: int | None = None,
        attributes: Mapping[str, AttributeValue] | None = None, limit: str | None = None,
    ) -> None:
        """Count, end the span and log one answered request. ``code``: the gRPC code name
        (what the metrics label every transport with); ``http``: the HTTP status a REST
        answer had (the log and the span's error status then go by it); ``attributes``: the
        transport's on the span; ``limit``: a quota's limit named by the answer when no
        QuotaExceededError is at hand."""
        elapsed = time.perf_counter() - observation.start
        if observation.method in COUNTED:
            metrics = self._metrics
            metrics.count_request(observation.model, observation.tenant, code, elapsed,
                                  observation.protocol)
            if observation.rejected_by == QUOTA or isinstance(error, QuotaExceededError):
                metrics.count_quota_rejection(observation.tenant, limit_of(error))
            elif limit is not None:
                metrics.count_quota_rejection(observation.tenant, limit)
        span = observation.span
        if span is not None:
            if span.is_recording():
                if attributes:
                    span.set_attributes(attributes)
                _set_ran(span, observation)
                failed = server_error(code) if http is None else (
                    str(http) if http >= 500 else None)
                if failed is not None:
                    span.set_status(Status(StatusCode.ERROR, failed))
            span.end()
            token, observation.otel_token = observation.otel_token, None
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
        if self.access_log is not None:
            answer = code if http is None else str(http)
            self.access_log.write(_entry(observation, answer, peer, elapsed, asked))


def server_error(code: str) -> str | None:
    """A gRPC code name as a span's error description, None when it is the client's doing."""
    return code if code in SERVER_ERRORS else None


def _set_ran(span: trace.Span, observation: Observation) -> None:
    if observation.model is not None:
        span.set_attribute(ATTR_MODEL, observation.model.name)
        span.set_attribute(ATTR_VERSION, observation.model.version)
    if observation.rows is not None:
        span.set_attribute(ATTR_ROWS, observation.rows)


def _entry(
    observation: Observation, code: str, peer: str, elapsed: float, asked: Asked
) -> AccessEntry:
    """The access-log line: the model and version that ran, else those the request asked
    for (escaped and cut by the log's formatter)."""
    model, version = asked
    if observation.model is not None:
        model, version = observation.model.name, str(observation.model.version)
    queue_s, compute_s = observation.queue_s, observation.compute_s
    return AccessEntry(
        method=observation.method,
        code=code,
        peer=peer,
        tenant=observation.tenant,
        model=model or None,
        version=version or None,
        rows=observation.rows,
        batch_rows=observation.batch_rows,
        queue_us=None if queue_s is None else int(queue_s * 1e6),
        compute_us=None if compute_s is None else int(compute_s * 1e6),
        total_us=int(elapsed * 1e6),
        trace_id=observation.trace_id or None,
        protocol=observation.protocol,
    )
