"""The RPC-level observer: opens each inference RPC's record and server span, and when the
RPC ends counts it, ends the span and writes the access log line (the edge calls it)."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, Final, TypeAlias

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from gateway.errors import LIMIT_KEY, QuotaExceededError, limit_of
from gateway.observability.access_log import AccessEntry, AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import (
    ATTR_MODEL,
    ATTR_ROWS,
    ATTR_TENANT,
    ATTR_VERSION,
    SAMPLING_MODEL,
    TRACE_ID_KEY,
    Tracing,
    trace_id_hex,
)
from gateway.request.context import QUOTA, RequestRecord

# The semantic conventions' server-side error codes; the others are the client's doing.
_SERVER_ERRORS: Final = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
    grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


@functools.cache
def _split(method: str) -> tuple[str, str]:
    # Only registered method names get here, so the cache stays as small as the API.
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _peer_address(peer: str) -> tuple[str, int | None]:
    # grpc peers look like ipv4:127.0.0.1:5555, ipv6:[::1]:5555 or unix:/path.
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else None
    return rest or peer, None


def _status_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcObserver:
    """Observes every unary RPC of the inference service (health and reflection are left
    alone: probes would drown the data). The edge opens a record before any other check
    runs, so the observer sees what the in-flight cap and auth answer, and finishes it when
    the RPC ends."""

    def __init__(
        self, metrics: Metrics, tracing: Tracing | None, access_log: AccessLog | None
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._access_log = access_log

    def open(
        self, method: str, context: Context, metadata: tuple[tuple[str, Any], ...] | None = None,
        model: str | None = None,
    ) -> tuple[RequestRecord, tuple[tuple[str, str], ...]]:
        """Start the record (and span) of one RPC; returns it with the trailers every
        answer of the RPC carries (the trace id when tracing is on). ``metadata``: the
        call's, if the caller has read it already; ``model``: the one the request names
        (its trace settings decide the sampling)."""
        service, name = _split(method)
        record = RequestRecord(method=name, start=time.perf_counter())
        if self._tracing is None:
            return record, ()
        if metadata is None:
            metadata = tuple(context.invocation_metadata() or ())
        span_name = method.lstrip("/")
        trace_id = self._tracing.sampled_out_root(metadata, span_name, model)
        if trace_id is None:
            # Opened before the inner checks run, so their spans (auth) are children.
            parent = self._tracing.extract(metadata)
            attributes = {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}
            if model:
                attributes[SAMPLING_MODEL] = model
            span = self._tracing.tracer.start_span(
                span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            record.tracer = self._tracing.tracer
            record.span = span
            record.otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
            trace_id = trace_id_hex(span)
        record.trace_id = trace_id
        ours = ((TRACE_ID_KEY, trace_id),)
        context.set_trailing_metadata(ours)
        return record, ours

    def close(
        self, record: RequestRecord, context: Context, request: Any,
        error: BaseException | None,
    ) -> None:
        """Count, end the span and log one finished RPC."""
        code = _status_code(context, error)
        elapsed = time.perf_counter() - record.start
        code_name = code.name
        if record.method == "ModelInfer":
            self._metrics.count_request(record.model, record.tenant, code_name, elapsed)
            if record.rejected_by == QUOTA or isinstance(error, QuotaExceededError):
                self._metrics.count_quota_rejection(record.tenant, limit_of(error))
            elif code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                limit = _named_limit(context)
                if limit is not None:
                    self._metrics.count_quota_rejection(record.tenant, limit)
        span = record.span
        if span is None and self._access_log is None:
            return
        # The peer is only worth its lookup when a span or a log line will carry it.
        peer = context.peer()
        if span is not None:
            self._end_span(record, span, code, peer)
        if self._access_log is not None:
            self._access_log.write(
                access_entry(record, code_name, peer, elapsed, _asked(request)))

    def _end_span(
        self, record: RequestRecord, span: trace.Span, code: grpc.StatusCode, peer: str
    ) -> None:
        if span.is_recording():
            span.set_attribute("rpc.grpc.status_code", code.value[0])
            host, port = _peer_address(peer)
            span.set_attribute("network.peer.address", host)
            if port is not None:
                span.set_attribute("network.peer.port", port)
            if record.tenant:
                span.set_attribute(ATTR_TENANT, record.tenant)
            set_ran(span, record)
            if code in _SERVER_ERRORS:
                span.set_status(Status(StatusCode.ERROR, code.name))
        span.end()
        _detach(record)


def set_ran(span: trace.Span, record: RequestRecord) -> None:
    """Put on a call's span the model, version and rows it ran with, where known."""
    if record.model is not None:
        span.set_attribute(ATTR_MODEL, record.model.name)
        span.set_attribute(ATTR_VERSION, record.model.version)
    if record.rows is not None:
        span.set_attribute(ATTR_ROWS, record.rows)


def _detach(record: RequestRecord) -> None:
    token = record.otel_token
    if token is not None:
        record.otel_token = None
        otel_context.detach(token)  # type: ignore[arg-type]


def _named_limit(context: Context) -> str | None:
    """The quota's trailer the answer carries (a quota rejection, not a full queue): the
    modelgate-limit trailer is part of the wire contract."""
    for key, value in context.trailing_metadata() or ():
        if key == LIMIT_KEY:
            return str(value)
    return None


def _asked(request: Any) -> tuple[str | None, str | None]:
    """The model and version the request named, if it names any."""
    if request is None:
        return None, None
    model = getattr(request, "model_name", None) or getattr(request, "name", None)
    version = getattr(request, "model_version", None) or getattr(request, "version", None)
    return model, version


def access_entry(
    record: RequestRecord, code: str, peer: str, elapsed: float,
    asked: tuple[str | None, str | None], *, protocol: str = "grpc",
) -> AccessEntry:
    """The access-log line of one answered call (an RPC or a stream's message): the model
    and version it ran, else those it ``asked`` for (escaped and cut by the log's formatter)."""
    model, version = asked
    if record.model is not None:
        model, version = record.model.name, str(record.model.version)
    return AccessEntry(
        method=record.method,
        code=code,
        peer=peer,
        tenant=record.tenant,
        model=model or None,
        version=version or None,
        rows=record.rows,
        batch_rows=record.batch_rows,
        queue_us=None if record.queue_s is None else int(record.queue_s * 1e6),
        compute_us=None if record.compute_s is None else int(record.compute_s * 1e6),
        total_us=int(elapsed * 1e6),
        trace_id=record.trace_id or None,
        protocol=protocol,
    )
