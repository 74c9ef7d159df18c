"""Authentication, enforced in one place for every RPC: a server interceptor that turns the
caller's key (and client certificate) into a Tenant, and the model visibility checks."""

from __future__ import annotations

import contextvars
import inspect
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Final, TypeAlias

import grpc

from gateway import observe
from gateway.errors import AuthenticationError, ModelNotFoundError, unknown_model
from gateway.sanitize import echoed
from gateway.status import status_of
from gateway.tenants import ANONYMOUS, ApiKey, Tenant, TenantRegistry, hash_key, key_tenant

# The only RPCs a caller without a key may use: health (gRPC's health service and the V2
# protocol's ServerLive/ServerReady, which load balancers and orchestrators probe; they
# answer booleans and disclose nothing) and reflection (tools discover the API). Every
# other RPC on the server, present or future, needs a tenant.
ANONYMOUS_SERVICES: Final = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
ANONYMOUS_METHODS: Final = frozenset({
    "/inference.GRPCInferenceService/ServerLive",
    "/inference.GRPCInferenceService/ServerReady",
})
MISSING_KEY: Final = "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
# One message for every rejected credential: it must not say which part was wrong.
INVALID: Final = "invalid API key or client certificate"
# A stored-hash stand-in, so an unknown tenant costs the same comparison as a known one.
_DUMMY: Final = Tenant(id="-", keys=(ApiKey(id="dummy", hash="sha256:" + "0" * 64, created=0.0),))

_current: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar(
    "modelgate_tenant", default=None
)

Metadata = Sequence[tuple[str, str | bytes]]


def current_tenant() -> Tenant:
    """The tenant of the RPC being served. Raises when the interceptor did not run, so a
    wiring mistake refuses requests instead of serving them anonymously."""
    tenant = _current.get()
    if tenant is None:
        raise AuthenticationError(MISSING_KEY)
    return tenant


def use_tenant(tenant: Tenant) -> contextvars.Token[Tenant | None]:
    """Make ``tenant`` the current one (the interceptor does this; tests may too)."""
    return _current.set(tenant)


class Authenticator:
    """Metadata (and the client certificate's subject) → Tenant, or AuthenticationError.
    Without a registry the gateway is open: every caller is the anonymous tenant."""

    def __init__(
        self, registry: TenantRegistry | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self.clock = clock

    def authenticate(self, metadata: Metadata, peer_subject: str | None = None) -> Tenant:
        if self.registry is None:
            return ANONYMOUS
        key = _key_from(metadata)
        if key is None:
            raise AuthenticationError(MISSING_KEY)
        tenant_id = key_tenant(key)
        tenant = self.registry.tenants.get(tenant_id or "", _DUMMY)
        if not tenant.key_matches(hash_key(key), self.clock()) or tenant is _DUMMY:
            raise AuthenticationError(INVALID)
        if tenant.client_subject is not None and (
            peer_subject is None or _rdns(tenant.client_subject) != _rdns(peer_subject)
        ):
            raise AuthenticationError(INVALID)
        return tenant


def _key_from(metadata: Metadata) -> str | None:
    for name, value in metadata:
        text = value.decode("ascii", "replace") if isinstance(value, bytes) else value
        if name == "authorization":
            scheme, _, credential = text.strip().partition(" ")
            if scheme.lower() == "bearer" and credential.strip():
                return credential.strip()
        elif name == "x-api-key" and text.strip():
            return text.strip()
    return None


def _rdns(subject: str) -> list[str]:
    # gRPC writes subjects leaf-first ('O=Acme,CN=acme'); people write them either way.
    parts = re.split(r"(?<!\\),", subject)
    return sorted(part.strip() for part in parts if part.strip())


def peer_subject(context: grpc.aio.ServicerContext[Any, Any]) -> str | None:
    """The verified client certificate's subject (RFC 2253, e.g. 'CN=acme,O=Acme'), if the
    connection is mutual TLS; gRPC core puts only verified peers in the auth context."""
    values = list(context.auth_context().get("x509_subject") or ())
    if not values:
        return None
    first: object = values[0]
    return first.decode("utf-8", "replace") if isinstance(first, bytes) else str(first)


Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Wraps every method handler (except the anonymous allow-list) so the call is
    authenticated before the servicer runs, with the tenant set for the servicer."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator
        self._guarded: dict[str, Handler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        handler = await continuation(handler_call_details)
        method: str = handler_call_details.method
        if handler is None or method in ANONYMOUS_METHODS or method.startswith(
            ANONYMOUS_SERVICES
        ):
            return handler
        guarded = self._guarded.get(method)
        if guarded is None:
            guarded = self._guarded[method] = self._guard(handler)
        return guarded

    async def _admit(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            with observe.stage("auth"):  # a child span of the RPC's when tracing is on
                tenant = self._authenticator.authenticate(
                    tuple(context.invocation_metadata() or ()), peer_subject(context)
                )
        except AuthenticationError as exc:
            status = status_of(exc)
            await context.abort(status.code, status.message)
        _current.set(tenant)
        observe.set_tenant(tenant.id)  # metrics, traces and the access log name the tenant

    def _guard(self, handler: Handler) -> Handler:
        admit = self._admit
        if handler.unary_unary is not None or handler.stream_unary is not None:
            unary_behavior: Any = handler.unary_unary or handler.stream_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
                await admit(context)
                return await unary_behavior(request, context)

            make = (grpc.unary_unary_rpc_method_handler if handler.unary_unary is not None
                    else grpc.stream_unary_rpc_method_handler)
            return make(unary, handler.request_deserializer, handler.response_serializer)
        stream_behavior: Any = handler.unary_stream or handler.stream_stream

        async def stream(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            await admit(context)
            result = stream_behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    yield response
            else:
                await result

        make = (grpc.unary_stream_rpc_method_handler if handler.unary_stream is not None
                else grpc.stream_stream_rpc_method_handler)
        return make(stream, handler.request_deserializer, handler.response_serializer)


def visible_version(name: str, version: str) -> str:
    """The version the current tenant's request runs (its pin when it asked for none);
    a model or version it may not use is NOT_FOUND with the unknown model's message."""
    tenant = current_tenant()
    if not tenant.can_see(name):
        raise unknown_model(name)
    effective = tenant.effective_version(name, version)
    if not tenant.allows(name, effective):
        what = (f"version {int(effective)}" if effective.isdigit()
                else f"version label '{effective}'")
        raise ModelNotFoundError(f"model '{echoed(name)}' has no {what}")
    return effective

