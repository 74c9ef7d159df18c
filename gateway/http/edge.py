"""The REST port's edge: every request passes here once, in the gRPC edge's order: observe
(it sees what every later check answers), the in-flight cap (inference only), auth (all but
the health probes; a request with a body is authenticated on its head, before the body is
read, by ``screen``), then the endpoint; a raised error becomes its row of the status table
as an HTTP status with a ``{"error": ...}`` body. A successful inference is compressed on
Accept-Encoding; nothing else is, as Triton does (tritonclient.http.aio reads them raw)."""

from __future__ import annotations

import math
from typing import Final

from gateway.errors import (
    LIMIT_KEY,
    RETRY_AFTER_KEY,
    AuthenticationError,
    UnsupportedCodingError,
)
from gateway.http.content_coding import REQUEST_CODINGS, accepted, compress
from gateway.http.messages import HttpRequest, HttpResponse, error_response
from gateway.http.routes import ANONYMOUS, CAPPED, Route, match
from gateway.http.service import RestService
from gateway.observability import observe
from gateway.observability.access_log import AccessLog
from gateway.observability.edge_observer import EdgeObserver
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import TRACE_ID_KEY, Tracing
from gateway.request.context import RequestContext
from gateway.request.inflight import InflightLimit
from gateway.request.observation import Observation
from gateway.status import Status, status_of
from gateway.tenancy.auth import Authenticator
from gateway.tenancy.tenants import ANONYMOUS as OPEN_TENANT
from gateway.tenancy.tenants import Tenant

_NOT_FOUND: Final = "no such endpoint; the V2 REST API lives under /v2"
# What a request whose client went away is logged as (nginx's "client closed request").
_CLIENT_GONE: Final = 499


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
        self._observer = EdgeObserver(metrics, tracing, access_log)

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
        observation = self._open(request, route)
        error: Exception | None = None
        status: Status | None = None
        try:
            response = await self._serve(route, request, observation)
        except Exception as exc:
            error, status = exc, status_of(exc)
            response = _error(exc, status)
        except BaseException as exc:  # cancelled: the client went away
            self._close(observation, route, request, exc, status=None, http=_CLIENT_GONE)
            raise
        if observation.trace_id is not None:
            response.headers = (*response.headers, (TRACE_ID_KEY, observation.trace_id))
        self._close(observation, route, request, error, status=status, http=response.status)
        if route.name != "ModelInfer" or response.status != 200:
            return response
        return _encoded(response, request.headers.get("accept-encoding"))

    async def _serve(
        self, route: Route, request: HttpRequest, observation: Observation
    ) -> HttpResponse:
        started = self._inflight.enter() if route.name in CAPPED else None
        try:
            tenant = self._authenticate(request, observation)
            context = RequestContext(tenant, protocol="http", observation=observation)
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
        observation = self._open(request, route)
        try:
            request.tenant = self._authenticate(request, observation)
        except AuthenticationError as exc:
            status = status_of(exc)
            self._close(observation, route, request, exc, status=status, http=status.http)
            return _error(exc, status)
        return None

    def _authenticate(self, request: HttpRequest, observation: Observation) -> Tenant:
        authenticator = self._authenticator
        with observe.stage(observation, "auth"):
            if request.tenant is not None:
                tenant = request.tenant  # authenticated on its head (screen)
            elif authenticator.registry is None:
                tenant = OPEN_TENANT  # open mode: nothing to check
            else:
                tenant = authenticator.authenticate(
                    tuple(request.headers.items()), request.peer_subject
                )
        observe.set_tenant(observation, tenant.id)
        return tenant

    # -- observation ---------------------------------------------------------------------

    def _open(self, request: HttpRequest, route: Route) -> Observation:
        """The request's observation, with its server span (a child of the caller's
        traceparent) when traced; the model a route names picks its trace settings."""
        observer = self._observer
        if observer.tracing is None:
            return observer.open(route.name, "http", (), "", {})
        return observer.open(
            route.name, "http", tuple(request.headers.items()),
            f"{request.method} {route.name}",
            {"http.request.method": request.method, "url.path": request.path,
             "network.protocol.name": "http"},
            model=route.model or None)

    def _close(self, observation: Observation, route: Route, request: HttpRequest,
               error: BaseException | None, *, status: Status | None, http: int) -> None:
        """``status``: the table's row for ``error`` (None: the endpoint answered ``http``
        itself, or the client went away); metrics count an inference under that row's gRPC
        code, the access log and span carry the HTTP status."""
        # An endpoint's own answer (a readiness 503 included) is what it was asked for.
        code = ("OK" if error is None else "CANCELLED") if status is None else status.code.name
        attributes = None if observation.span is None else {"http.response.status_code": http}
        self._observer.close(
            observation, code, error, request.peer, (route.model, route.version),
            http=http, attributes=attributes)


def _error(exc: Exception, status: Status) -> HttpResponse:
    """The table's answer (``status``) to ``exc``: its HTTP status, the message, and for
    rejections the retry hint (Retry-After in whole seconds, retry-after-ms exact) and the
    limit's name."""
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
