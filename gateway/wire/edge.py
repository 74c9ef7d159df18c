"""The server's edge: every method handler a service registers passes through here once, at
start-up, and comes out wrapped in the checks it needs (observe, in-flight cap, auth) and in
the one error mapping (domain errors -> gateway/status.py -> the RPC's status); one generic
handler then serves the wrapped handlers from a dict.

grpc.aio interceptors would do the same work, but they run a chain of coroutines and build
handler objects on every RPC; wrapping once keeps the per-RPC cost to one coroutine."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, NoReturn, TypeAlias, cast

import grpc
from grpc.aio import AbortError

from gateway.errors import (
    AuthenticationError,
    GatewayError,
    InvalidRequestError,
    OverloadedError,
)
from gateway.observability import observe
from gateway.request.context import RequestContext
from gateway.request.inflight import InflightLimit
from gateway.request.observation import Observation
from gateway.settings import Settings
from gateway.status import status_of
from gateway.tenancy.auth import (
    ANONYMOUS_METHODS,
    ANONYMOUS_SERVICES,
    Authenticator,
    peer_subject,
)
from gateway.tenancy.tenants import ANONYMOUS, Tenant
from gateway.wire.call import CallContext
from gateway.wire.compression import COMPRESSED_FIRST_BYTES, inflated
from gateway.wire.rpc_observer import RpcObserver
from modelgate_pb import grpc_service_pb2 as pb

INFERENCE_SERVICE: Final = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
# The RPCs that carry tensors and do work; every other RPC is cheap and stays uncapped, so
# probes (grpc.health, ServerLive/Ready, ModelReady) answer however loaded the server is.
# ModelStreamInfer is not among them: an open stream costs no inference, and each of its
# messages takes a slot while it runs (gateway/wire/stream.py).
CAPPED_METHODS: Final = frozenset({f"/{INFERENCE_SERVICE}/ModelInfer"})

# What a compressed request may inflate to unless the server says (settings' default).
DEFAULT_MESSAGE_BYTES: Final = Settings().max_message_bytes

Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Unary = Callable[[Any, Context], Awaitable[Any]]


class EdgeError(Exception):
    """A service registered handlers the edge cannot enumerate (so it could not guard
    them): a wiring mistake, raised at start-up."""


class Undecodable:
    """What a request deserializer returns for bytes that are not the method's message (the
    handler then answers INVALID_ARGUMENT naming the method; gRPC itself would answer
    UNKNOWN, saying nothing of what was wrong), or for a compressed message that does not
    inflate within max_message_bytes (RESOURCE_EXHAUSTED)."""

    __slots__ = ("error",)

    def __init__(self, error: GatewayError) -> None:
        self.error = error


def _lenient(
    deserializer: Callable[[bytes], Any] | None, method: str, limit: int
) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None
    message = f"the request is not a valid {method.rpartition('/')[2]} request message"

    def deserialize(data: bytes) -> Any:
        # Most messages are plain: one byte tells, before any call.
        if data and data[0] in COMPRESSED_FIRST_BYTES:
            try:
                data = inflated(data, limit)  # gzip or deflate: bounded (compression.py)
            except GatewayError as exc:
                return Undecodable(exc)
        try:
            return deserializer(data)
        except Exception:  # any parse failure is the client's bytes
            return Undecodable(InvalidRequestError(message))

    return deserialize


def _check_decoded(request: Any) -> None:
    if request.__class__ is Undecodable:
        raise request.error


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _check_decoded(request)
        yield request


class _Table(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """The one generic handler of the server: full method name → wrapped handler."""

    def __init__(self, handlers: Mapping[str, Handler]) -> None:
        self._handlers = dict(handlers)

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Handler | None:
        return self._handlers.get(handler_call_details.method)


def _passthrough(serializer: Callable[[Any], bytes] | None) -> Callable[[Any], bytes] | None:
    """A response serializer that also takes bytes as they are: a servicer that encoded its
    answer itself (ModelInfer does, see gateway/wire/conversion.py) returns the wire bytes."""
    if serializer is None:
        return None

    def serialize(response: Any) -> bytes:
        return response if response.__class__ is bytes else serializer(response)

    return serialize


class Edge:
    """Collects handlers like a grpc server does (the generated ``add_*_to_server``
    functions take it as their server), then installs them, wrapped, on the real one."""

    def __init__(
        self, observer: RpcObserver, inflight: InflightLimit, authenticator: Authenticator,
        *, max_message_bytes: int = DEFAULT_MESSAGE_BYTES,
    ) -> None:
        self._observer = observer
        self._max_message = max_message_bytes  # a compressed request's inflated limit
        self._inflight = inflight
        self._authenticator = authenticator
        self._services: dict[str, dict[str, Handler]] = {}
        self._generic_services: set[str] = set()

    # -- the registration API of grpc.Server that generated code calls -------------------

    def add_generic_rpc_handlers(self, handlers: Iterable[Any]) -> None:
        for handler in handlers:
            name = getattr(handler, "service_name", None)
            if not callable(name):
                raise EdgeError(f"cannot enumerate the methods of {handler!r}")
            self._generic_services.add(name())

    def add_registered_method_handlers(
        self, service_name: str, method_handlers: Mapping[str, Handler]
    ) -> None:
        self._services.setdefault(service_name, {}).update(method_handlers)

    # -- installing ----------------------------------------------------------------------

    def install(self, server: grpc.aio.Server) -> dict[str, Handler]:
        """Wrap every collected handler and serve them on ``server``; returns the table."""
        missing = self._generic_services - set(self._services)
        if missing:
            raise EdgeError(f"services registered without their method table: {missing}")
        table: dict[str, Handler] = {}
        for service, handlers in self._services.items():
            wrapped = {
                name: self.wrap(f"/{service}/{name}", handler)
                for name, handler in handlers.items()
            }
            table.update({f"/{service}/{name}": h for name, h in wrapped.items()})
            # A no-op in grpc.aio today; kept so the server knows its registered methods.
            register: Any = server
            register.add_registered_method_handlers(service, wrapped)
        server.add_generic_rpc_handlers((_Table(table),))
        return table

    def wrap(self, method: str, handler: Handler) -> Handler:
        """The handler with the checks ``method`` needs, in this order: observe (inference
        RPCs: it must see what every later check answers), the in-flight cap (sheds before
        any key is hashed), auth (everything but the anonymous allow-list); then the
        handler, whose domain errors are answered through the status table."""
        service = method.lstrip("/").rpartition("/")[0]
        guarded = not (method in ANONYMOUS_METHODS or method.startswith(ANONYMOUS_SERVICES))
        # Counted even without a cap: the count also tells runtimes whether they are alone.
        capped = method in CAPPED_METHODS
        serializer = _passthrough(handler.response_serializer)
        deserializer = _lenient(handler.request_deserializer, method, self._max_message)
        if handler.unary_unary is not None or handler.stream_unary is not None:
            observed = service == INFERENCE_SERVICE and handler.unary_unary is not None
            # grpc.aio behaviors are coroutines; the stubs only know the sync signature.
            inner = cast(Unary, handler.unary_unary or handler.stream_unary)
            behavior = self._unary(method, inner, observed, capped, guarded,
                                   streamed=handler.unary_unary is None)
            make_unary = (grpc.unary_unary_rpc_method_handler if handler.unary_unary
                          is not None else grpc.stream_unary_rpc_method_handler)
            return make_unary(behavior, deserializer, serializer)
        streaming = handler.unary_stream or handler.stream_stream
        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        # A handler that takes raw bytes (ModelStreamInfer parses each message itself) has
        # nothing undecodable to check: its messages skip the checking generator.
        checked = handler.stream_stream is not None and deserializer is not None
        return make(self._stream(streaming, capped, guarded, checked), deserializer, serializer)

    def _unary(
        self, method: str, behavior: Unary, observed: bool, capped: bool, guarded: bool, *,
        streamed: bool = False,
    ) -> Unary:
        observer, limit, checks = self._observer, self._inflight, self._checks

        async def call(request: Any, context: Context) -> Any:
            observation: Observation | None = None
            ours: tuple[tuple[str, str], ...] = ()
            # grpc.aio builds a new tuple on every invocation_metadata() call (about 6 us
            # with a few entries): an inference RPC reads it once here for the observer,
            # auth and the servicer (through the CallContext).
            metadata = tuple(context.invocation_metadata() or ()) if observed else None
            if observed:
                observation, ours = observer.open(method, context, metadata, request)
            started: float | None = None
            error: BaseException | None = None
            try:
                try:
                    started, tenant = checks(context, capped, guarded, observation, metadata)
                except (OverloadedError, AuthenticationError) as exc:
                    error = exc
                    await _reject(context, exc, ours)
                served: Any = context
                if tenant is not None:
                    served = CallContext(
                        context, RequestContext(tenant, observation=observation), ours, metadata)
                try:
                    if streamed:
                        request = _checked(request)
                    else:
                        _check_decoded(request)
                    return await behavior(request, served)
                except Exception as exc:
                    error = exc
                    await _reject(context, exc, ours)
            except BaseException as exc:
                if error is None:
                    error = exc
                raise
            finally:
                if started is not None:
                    limit.leave(started)
                if observation is not None:
                    observer.close(observation, context, request, error)

        return call

    def _stream(self, behavior: Any, capped: bool, guarded: bool, streamed: bool) -> Any:
        limit, checks = self._inflight, self._checks

        async def call(request: Any, context: Context) -> AsyncIterator[Any]:
            started: float | None = None
            metadata = tuple(context.invocation_metadata() or ()) if guarded else None
            try:
                try:
                    started, tenant = checks(context, capped, guarded, None, metadata)
                except (OverloadedError, AuthenticationError) as exc:
                    await _reject(context, exc)
                served: Any = context
                if tenant is not None:
                    served = CallContext(
                        context, RequestContext(tenant, protocol="grpc_stream"), (), metadata
                    )
                try:
                    if streamed:
                        request = _checked(request)
                    else:
                        _check_decoded(request)
                    result = behavior(request, served)
                    if inspect.isasyncgen(result):
                        async for response in result:
                            yield response
                    else:
                        await result
                except Exception as exc:
                    await _reject(context, exc)
            finally:
                if started is not None:
                    limit.leave(started)

        return call

    def _checks(
        self, context: Context, capped: bool, guarded: bool,
        observation: Observation | None,
        metadata: tuple[tuple[str, Any], ...] | None = None,
    ) -> tuple[float | None, Tenant | None]:
        """Take an in-flight slot (returns its start time) and authenticate (returns the
        tenant; None for the anonymous allow-list); raises OverloadedError or
        AuthenticationError holding no slot."""
        started = self._inflight.enter() if capped else None
        tenant: Tenant | None = None
        if guarded:
            try:
                tenant = self._authenticate(context, observation, metadata)
            except AuthenticationError:
                if started is not None:
                    self._inflight.leave(started)
                raise
        return started, tenant

    def _authenticate(self, context: Context, observation: Observation | None,
                      metadata: tuple[tuple[str, Any], ...] | None = None) -> Tenant:
        """The caller's tenant (``metadata``: the call's, if already read); raises
        AuthenticationError."""
        authenticator = self._authenticator
        with observe.stage(observation, "auth"):  # a child of the RPC's span when traced
            if authenticator.registry is None:
                tenant = ANONYMOUS  # open mode: nothing to check, so no metadata to read
            else:
                if metadata is None:
                    metadata = tuple(context.invocation_metadata() or ())
                tenant = authenticator.authenticate(metadata, lambda: peer_subject(context))
        observe.set_tenant(observation, tenant.id)  # metrics, traces and the access log
        return tenant


async def _reject(
    context: Context, exc: BaseException, ours: tuple[tuple[str, str], ...] = ()
) -> NoReturn:
    """Answer the status the table gives ``exc``, with its trailers (retry hints) after the
    edge's own (the trace id). The one place a domain error becomes a gRPC status."""
    if isinstance(exc, AbortError):
        raise exc  # already answered
    status = status_of(exc)
    if status.trailers:
        context.set_trailing_metadata((*ours, *status.trailers.items()))
    await context.abort(status.code, status.message)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover
