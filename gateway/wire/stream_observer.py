"""What ModelStreamInfer observes: the stream's span, and for each message a record with its
own span (linked to the stream's), Prometheus counts under protocol grpc_stream, the access
log line and the quota-rejection count, as the RPC observer does for one unary call."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from gateway.errors import QuotaExceededError, limit_of
from gateway.observability.access_log import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import (
    ATTR_TENANT,
    SAMPLING_MODEL,
    Tracing,
    trace_id_hex,
)
from gateway.request.context import QUOTA, RequestRecord
from gateway.wire.rpc_observer import access_entry, set_ran

METHOD: Final = "ModelStreamInfer"
STREAM_SPAN: Final = "inference.GRPCInferenceService/ModelStreamInfer"
MESSAGE_SPAN: Final = "inference.GRPCInferenceService/ModelStreamInfer message"
PROTOCOL: Final = "grpc_stream"
_SERVER_ERRORS: Final = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED",
                                   "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})

Metadata = Sequence[tuple[str, str | bytes]]


class StreamTrace:
    """One stream's trace state: the caller's context (from the stream's metadata) and the
    stream's own span, which every message span links to."""

    __slots__ = ("parent", "span")

    def __init__(self, parent: otel_context.Context, span: trace.Span) -> None:
        self.parent = parent
        self.span = span


class StreamObserver:
    def __init__(
        self, metrics: Metrics, tracing: Tracing | None, access_log: AccessLog | None
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._access_log = access_log

    # -- the stream ----------------------------------------------------------------------

    def open_stream(self, metadata: Metadata, tenant: str) -> StreamTrace | None:
        tracing = self._tracing
        if tracing is None:
            return None
        parent = tracing.extract(metadata)
        span = tracing.tracer.start_span(
            STREAM_SPAN, context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": METHOD, ATTR_TENANT: tenant})
        return StreamTrace(parent, span)

    def refused_stream(self, tenant: str, error: QuotaExceededError) -> None:
        """Count a stream the tenant's quota refused as it opened (its ``streams``)."""
        self._metrics.count_quota_rejection(tenant, limit_of(error))

    @staticmethod
    def close_stream(stream: StreamTrace | None, code: str, messages: int) -> None:
        if stream is None:
            return
        span = stream.span
        if span.is_recording():
            span.set_attribute("modelgate.stream.messages", messages)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code))
        span.end()

    # -- one message ---------------------------------------------------------------------

    def open_message(self, stream: StreamTrace | None, tenant: str,
                     traceparent: str | None, model: str = "") -> RequestRecord:
        """A message's record; its span is a child of the message's own traceparent if it
        carries one, else of the stream's caller context, and links to the stream span.
        The span is made current in the calling task (each message runs in its own)."""
        record = RequestRecord(method=METHOD, start=time.perf_counter(), tenant=tenant)
        tracing = self._tracing
        if tracing is None or stream is None:
            return record
        parent = (tracing.extract((("traceparent", traceparent),)) if traceparent
                  else stream.parent)
        attributes = {"rpc.system": "grpc", "rpc.method": METHOD, ATTR_TENANT: tenant}
        if model:  # the sampler applies the model's trace settings
            attributes[SAMPLING_MODEL] = model
        span = tracing.tracer.start_span(
            MESSAGE_SPAN, context=parent, kind=SpanKind.SERVER,
            links=(Link(stream.span.get_span_context()),), attributes=attributes)
        record.tracer = tracing.tracer
        record.span = span
        record.trace_id = trace_id_hex(span)
        record.otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
        return record

    def close_message(self, record: RequestRecord, code: str, error: BaseException | None,
                      peer: str, asked: tuple[str, str]) -> None:
        """Count, end the span and log one answered message; ``asked`` is the model and
        version the message named (logged when it never resolved)."""
        elapsed = time.perf_counter() - record.start
        self._metrics.count_request(record.model, record.tenant, code, elapsed, PROTOCOL)
        if record.rejected_by == QUOTA or isinstance(error, QuotaExceededError):
            self._metrics.count_quota_rejection(record.tenant, limit_of(error))
        span = record.span
        if span is not None:
            if span.is_recording():
                span.set_attribute("rpc.grpc.status_code", grpc.StatusCode[code].value[0])
                set_ran(span, record)
                if code in _SERVER_ERRORS:
                    span.set_status(Status(StatusCode.ERROR, code))
            span.end()
            token, record.otel_token = record.otel_token, None
            if token is not None:
                otel_context.detach(token)  # type: ignore[arg-type]
        if self._access_log is not None:
            self._access_log.write(access_entry(record, code, peer, elapsed, asked,
                                                protocol=PROTOCOL))
