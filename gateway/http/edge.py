"""The REST port's edge: every request passes here once, in the gRPC edge's order: observe
(it sees what every later check answers), the in-flight cap (inference only), auth (all but
the health probes; a request with a body is authenticated on its head, before the body is
read, by ``screen``), then the endpoint; a raised error becomes its row of the status table
as an HTTP status with a ``{"error": ...}`` body. A successful inference is compressed on
Accept-Encoding; nothing else is, as Triton does (tritonclient.http.aio reads them raw)."""

from __future__ import annotations

import math
import time
from typing import Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, StatusCode

from gateway.errors import (
    LIMIT_KEY,
    RETRY_AFTER_KEY,
    AuthenticationError,
    QuotaExceededError,
    UnsupportedCodingError,
    limit_of,
)
from gateway.http.content_coding import REQUEST_CODINGS, accepted, compress
from gateway.http.messages import HttpRequest, HttpResponse, error_response
from gateway.http.routes import ANONYMOUS, CAPPED, Route, match
from gateway.http.service import RestService
from gateway.observability import observe
from gateway.observability.access_log import AccessEntry, AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import (
    ATTR_MODEL,
    ATTR_ROWS,
    ATTR_VERSION,
    SAMPLING_MODEL,
    TRACE_ID_KEY,
    Tracing,
    trace_id_hex,
)
from gateway.request.context import QUOTA, RequestContext, RequestRecord
from gateway.request.inflight import InflightLimit
from gateway.status import status_of
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.tenants import ANONYMOUS as OPEN_TENANT
from gateway.tenancy.tenants import Tenant

_NOT_FOUND: Final = "no such endpoint; the V2 REST API lives under /v2"
# gRPC's code names for the statuses the edge answers itself (metrics label HTTP answers
# with the code of the same error on gRPC, so one family counts both transports).
_CODE_OF_HTTP: Final = {200: "OK", 400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED",
                        403: "PERMISSION_DENIED", 404: "NOT_FOUND", 413: "RESOURCE_EXHAUSTED",
                        415: "INVALID_ARGUMENT",
                        429: "RESOURCE_EXHAUSTED", 499: "CANCELLED", 500: "INTERNAL",
                        501: "UNIMPLEMENTED", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}


class RestEdge:
    """The connection's handler: routes, checks and answers one request."""

    def __init__(
        self, service: RestService, inflight: InflightLimit, authenticator: Authenticator,
        metrics: Metrics, *, tracing: Tracing | None = None,
        access_log: AccessLog | None = None,
    ) -> None:
        self._service = service
        self._inflight = inflight
        self._authenticator = authenticator
        self._metrics = metrics
        self._tracing = tracing
        self._access_log = access_log

    async def handle(self, request: HttpRequest) -> HttpResponse:
        route = match(request.path)
        if route is None:
            return error_response(404, _NOT_FOUND)
        if request.method != route.method and request.method not in route.method.split():
            allowed = ", ".join(route.method.split())
            return error_response(405, f"{request.path[:200]} takes {allowed}",
                                  (("Allow", allowed),))
        if route.name in ANONYMOUS:
            return self._service.anonymous[route.name]()
        record = RequestRecord(method=route.name, start=time.perf_counter())
        trace_header = self._open_span(record, request, route)
        error: BaseException | None = None
        try:
            response = await self._serve(route, request, record)
        except Exception as exc:
            error = exc
            response = _error(exc)
        except BaseException as exc:  # cancelled: the client went away
            error = exc
            self._close(record, route, request, 499, error)
            raise
        if trace_header:
            response.headers = (*response.headers, trace_header)
        self._close(record, route, request, response.status, error)
        if route.name != "ModelInfer" or response.status != 200:
            return response
        return _encoded(response, request.headers.get("accept-encoding"))

    async def _serve(
        self, route: Route, request: HttpRequest, record: RequestRecord
    ) -> HttpResponse:
        started = self._inflight.enter() if route.name in CAPPED else None
        try:
            tenant = self._authenticate(request, record)
            context = RequestContext(tenant, protocol="http", record=record)
            return await self._service.endpoints[route.name](route, request, context)
        finally:
            if started is not None:
                self._inflight.leave(started)

    def screen(self, request: HttpRequest) -> HttpResponse | None:
        """A request with a body, its head complete and its body not yet read: one that
        needs a key and has no valid one is answered 401 now (observed as on ``handle``),
        so nobody without a key makes the server hold a body; a valid key's tenant rides
        on the request."""
        if self._authenticator.registry is None:
            return None
        route = match(request.path)
        if route is None or request.method != route.method or route.name in ANONYMOUS:
            return None  # answered without a key (404, 405, the probes) once complete
        record = RequestRecord(method=route.name, start=time.perf_counter())
        try:
            request.tenant = self._authenticate(request, record)
        except AuthenticationError as exc:
            self._close(record, route, request, 401, exc)
            return _error(exc)
        return None

    def _authenticate(self, request: HttpRequest, record: RequestRecord) -> Tenant:
        authenticator = self._authenticator
        with observe.stage(record, "auth"):
            if request.tenant is not None:
                tenant = request.tenant  # authenticated on its head (screen)
            elif authenticator.registry is None:
                tenant = OPEN_TENANT  # open mode: nothing to check
            else:
                tenant = authenticator.authenticate(
                    tuple(request.headers.items()), request.peer_subject
                )
        observe.set_tenant(record, tenant.id)
        return tenant

    # -- observation ---------------------------------------------------------------------

    def _open_span(
        self, record: RequestRecord, request: HttpRequest, route: Route
    ) -> tuple[str, str] | None:
        """Start the request's server span (a child of the caller's traceparent); returns
        the trace id header every answer carries, None when tracing is off."""
        tracing = self._tracing
        if tracing is None:
            return None
        carrier = tuple(request.headers.items())
        span_name = f"{request.method} {route.name}"
        # The model a route names picks its trace settings (the sampler reads SAMPLING_MODEL).
        model = route.model or None
        trace_id = tracing.sampled_out_root(carrier, span_name, model)
        if trace_id is None:
            parent = tracing.extract(carrier)
            attributes = {"http.request.method": request.method, "url.path": request.path,
                          "network.protocol.name": "http"}
            if model is not None:
                attributes[SAMPLING_MODEL] = model
            span = tracing.tracer.start_span(
                span_name, context=parent, kind=SpanKind.SERVER, attributes=attributes)
            record.tracer = tracing.tracer
            record.span = span
            record.otel_token = otel_context.attach(trace.set_span_in_context(span, parent))
            trace_id = trace_id_hex(span)
        record.trace_id = trace_id
        return TRACE_ID_KEY, trace_id

    def _close(self, record: RequestRecord, route: Route, request: HttpRequest, status: int,
               error: BaseException | None) -> None:
        elapsed = time.perf_counter() - record.start
        code = _CODE_OF_HTTP.get(status, "UNKNOWN")
        if error is not None and status != 499:
            code = status_of_name(error)
        if route.name == "ModelInfer":
            self._metrics.count_request(record.model, record.tenant, code, elapsed, "http")
            if record.rejected_by == QUOTA or isinstance(error, QuotaExceededError):
                self._metrics.count_quota_rejection(record.tenant, limit_of(error))
        span = record.span
        if span is not None:
            if span.is_recording():
                span.set_attribute("http.response.status_code", status)
                if record.model is not None:
                    span.set_attribute(ATTR_MODEL, record.model.name)
                    span.set_attribute(ATTR_VERSION, record.model.version)
                if record.rows is not None:
                    span.set_attribute(ATTR_ROWS, record.rows)
                if status >= 500:
                    span.set_status(trace.Status(StatusCode.ERROR, str(status)))
            span.end()
            token = record.otel_token
            if token is not None:
                record.otel_token = None
                otel_context.detach(token)  # type: ignore[arg-type]
        if self._access_log is not None:
            model = record.model
            self._access_log.write(AccessEntry(
                method=route.name, code=str(status), peer=request.peer, tenant=record.tenant,
                model=model.name if model else route.model or None,
                version=str(model.version) if model else route.version or None,
                rows=record.rows, batch_rows=record.batch_rows,
                queue_us=None if record.queue_s is None else int(record.queue_s * 1e6),
                compute_us=None if record.compute_s is None else int(record.compute_s * 1e6),
                total_us=int(elapsed * 1e6), trace_id=record.trace_id or None,
                protocol="http",
            ))


def status_of_name(error: BaseException) -> str:
    """The gRPC code name of an error (what the metrics label both transports with)."""
    return status_of(error).code.name


def _error(exc: Exception) -> HttpResponse:
    """The table's answer to ``exc``: its HTTP status, the message, and for rejections the
    retry hint (Retry-After in whole seconds, retry-after-ms exact) and the limit's name."""
    status = status_of(exc)
    headers: list[tuple[str, str]] = []
    retry_ms = status.trailers.get(RETRY_AFTER_KEY)
    if retry_ms is not None and retry_ms.isdigit():
        headers.append(("Retry-After", str(max(1, math.ceil(int(retry_ms) / 1000)))))
        headers.append((RETRY_AFTER_KEY, retry_ms))
    limit = status.trailers.get(LIMIT_KEY)
    if limit is not None:
        headers.append((LIMIT_KEY, limit))
    if isinstance(exc, AuthenticationError):
        headers.append(("WWW-Authenticate", 'Bearer realm="modelgate"'))
    if isinstance(exc, UnsupportedCodingError):
        headers.append(("Accept-Encoding", REQUEST_CODINGS))
    return error_response(status.http, status.message, tuple(headers))


def _encoded(response: HttpResponse, accept_encoding: str | None) -> HttpResponse:
    coding = accepted(accept_encoding) if response.body else None
    if coding is None:
        return response
    response.body = compress(response.body, coding)
    response.headers = (*response.headers, ("Content-Encoding", coding),
                        ("Vary", "Accept-Encoding"))
    return response
