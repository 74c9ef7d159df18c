"""Authentication: the caller's key (and client certificate) turned into a Tenant, and the
anonymous allow-list. gateway/wire/edge.py enforces it for every RPC in one place."""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

import grpc

from gateway.errors import AuthenticationError
from gateway.tenancy.tenants import ANONYMOUS, ApiKey, Tenant, TenantRegistry, hash_key, key_tenant

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
# Authenticated keys remembered (distinct valid keys in use are few; bounded regardless).
_KNOWN_KEYS: Final = 4096
MISSING_KEY: Final = "missing API key: send 'authorization: Bearer <key>' or 'x-api-key: <key>'"
# One message for every rejected credential: it must not say which part was wrong.
INVALID: Final = "invalid API key or client certificate"
# A stored-hash stand-in, so an unknown tenant costs the same comparison as a known one.
_DUMMY: Final = Tenant(id="-", keys=(ApiKey(id="dummy", hash="sha256:" + "0" * 64, created=0.0),))

Metadata = Sequence[tuple[str, str | bytes]]


class Authenticator:
    """Metadata (and the client certificate's subject) → Tenant, or AuthenticationError.
    Without a registry the gateway is open: every caller is the anonymous tenant."""

    def __init__(
        self, registry: TenantRegistry | None, clock: Callable[[], float] = time.time
    ) -> None:
        self.registry = registry
        self.clock = clock
        # Keys that authenticated, with their tenant, until the tenants in force change.
        # A dict lookup by the key string compares strings only on a 64-bit (randomly
        # seeded) hash match, so its timing says nothing about a wrong key's prefix.
        self._known: dict[str, tuple[Tenant, float]] = {}
        self._known_for: object = None

    def authenticate(
        self, metadata: Metadata, peer_subject: str | Callable[[], str | None] | None = None
    ) -> Tenant:
        """``peer_subject`` may be a function: the certificate is only looked up for a
        tenant bound to one."""
        if self.registry is None:
            return ANONYMOUS
        key = _key_from(metadata)
        if key is None:
            raise AuthenticationError(MISSING_KEY)
        tenants = self.registry.tenants
        if self._known_for is not tenants:  # a reload: every key is checked afresh
            self._known, self._known_for = {}, tenants
        now = self.clock()
        known = self._known.get(key)
        if known is not None and now < known[1]:
            tenant = known[0]
        else:
            tenant = self._check_key(key, tenants, now)
        if tenant.client_subject is not None:
            subject = peer_subject() if callable(peer_subject) else peer_subject
            if subject is None or _rdns(tenant.client_subject) != _rdns(subject):
                raise AuthenticationError(INVALID)
        return tenant


    def _check_key(self, key: str, tenants: Mapping[str, Tenant], now: float) -> Tenant:
        tenant = tenants.get(key_tenant(key) or "", _DUMMY)
        hashed = hash_key(key)
        if not tenant.key_matches(hashed, now) or tenant is _DUMMY:
            raise AuthenticationError(INVALID)
        # Remembered until the key expires (a rotated key has an expiry), bounded.
        expires = min((k.expires or math.inf) for k in tenant.keys if k.hash == hashed)
        if len(self._known) < _KNOWN_KEYS:
            self._known[key] = (tenant, expires)
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
