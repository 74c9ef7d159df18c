"""The typed per-request context: who calls (tenant), how (protocol), what it asked of
routing and scheduling, its trace headers, and the observation the edge opened.

Runtimes know a request's context only as an opaque slot (``InferRequest.context``); the
gateway's wrappers read it back through ``context_of`` / ``observation_of``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from gateway.request.observation import Observation, Protocol
from gateway.tenancy.tenants import Tenant
from runtimes.base import InferRequest


@dataclass(slots=True)
class RequestContext:
    """One request's caller context, built by the transport adapter and read by the
    pipeline. ``deadline`` is on the monotonic clock; ``priority`` 0 means none asked (the
    tenant's level applies); ``observation`` is None for an unobserved request. ``arrived_ns``
    (perf_counter) is when the edge took the request: its statistics' durations start there."""

    tenant: Tenant
    protocol: Protocol = "grpc"
    label: str | None = None
    routing_key: str | None = None
    deadline: float | None = None
    priority: int = 0
    timeout_us: int | None = None
    trace_headers: dict[str, str] = field(default_factory=dict)
    observation: Observation | None = None
    arrived_ns: int = field(default_factory=time.perf_counter_ns)


def context_of(request: InferRequest) -> RequestContext | None:
    """The gateway context an InferRequest carries (None: warm-up, or a bare runtime call)."""
    context = request.context
    return context if isinstance(context, RequestContext) else None


def observation_of(request: InferRequest) -> Observation | None:
    """The observation a request carries: its context's, or the one a version's observer
    attached to a request that came without (a bare runtime call, a shadow's copy)."""
    context = request.context
    if isinstance(context, RequestContext):
        return context.observation
    return context if isinstance(context, Observation) else None
