"""The typed per-request context: who calls (tenant), how (protocol), what it asked of
routing and scheduling, its trace headers, and the observation record the edge fills in.

Runtimes know a request's context only as an opaque slot (``InferRequest.context``); the
gateway's wrappers read it back through ``context_of`` / ``record_of``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Final, Literal

from opentelemetry import trace

from gateway.tenancy.tenants import Tenant
from model_store.spec import ModelId
from runtimes.base import InferRequest

Protocol = Literal["grpc", "grpc_stream", "http"]

# Reasons a request was rejected before it ran, as the observation record reports them.
QUOTA: Final = "quota"


@dataclass(slots=True)
class RequestRecord:
    """What is known about one observed request so far: filled in as the request moves
    through the gateway, read once by the adapter's observer when the request ends."""

    method: str
    start: float
    tracer: trace.Tracer | None = None
    span: trace.Span | None = None
    tenant: str | None = None
    model: ModelId | None = None
    rows: int | None = None
    queue_s: float | None = None
    compute_s: float | None = None
    batch_rows: int | None = None
    rejected_by: str | None = None
    otel_token: object | None = None
    trace_id: str | None = None  # 32 hex digits when tracing is on, with or without a span


@dataclass(slots=True)
class RequestContext:
    """One request's caller context, built by the transport adapter and read by the
    pipeline. ``deadline`` is on the monotonic clock; ``priority`` 0 means none asked (the
    tenant's level applies); ``record`` is None for an unobserved request. ``arrived_ns``
    (perf_counter) is when the edge took the request: its statistics' durations start there."""

    tenant: Tenant
    protocol: Protocol = "grpc"
    label: str | None = None
    routing_key: str | None = None
    deadline: float | None = None
    priority: int = 0
    timeout_us: int | None = None
    trace_headers: dict[str, str] = field(default_factory=dict)
    record: RequestRecord | None = None
    arrived_ns: int = field(default_factory=time.perf_counter_ns)


def context_of(request: InferRequest) -> RequestContext | None:
    """The gateway context an InferRequest carries (None: warm-up, or a bare runtime call)."""
    context = request.context
    return context if isinstance(context, RequestContext) else None


def record_of(request: InferRequest) -> RequestRecord | None:
    """The observation record of the request's context, if it is observed."""
    context = request.context
    return context.record if isinstance(context, RequestContext) else None
