"""One request's observation: opened at the transport's edge, filled in as the request moves
through the gateway (tenant, model, rows, queue and compute figures), closed once by the edge.

It rides on the request's context, and so on every batch the request is merged into
(``InferRequest.members``): the version's observers find it there, with no lookup by id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from opentelemetry import trace

from model_store.spec import ModelId

Protocol = Literal["grpc", "grpc_stream", "http"]

# Reasons a request was rejected before it ran, as the observation reports them.
QUOTA: Final = "quota"


@dataclass(slots=True)
class Observation:
    """What is known about one request so far. ``start`` is perf_counter seconds at the
    edge; ``span`` the request's server span (None: tracing off or sampled out without
    one); ``infer_span`` the version's 'infer' child span. ``enqueued``/``dispatched`` are
    when the request entered its version's stack and when its batch started (perf_counter
    seconds, and wall-clock ns for the span timestamps)."""

    method: str
    start: float
    protocol: Protocol = "grpc"
    tracer: trace.Tracer | None = None
    span: trace.Span | None = None
    otel_token: object | None = None
    trace_id: str | None = None  # 32 hex digits when tracing is on, with or without a span
    tenant: str | None = None
    model: ModelId | None = None
    rows: int | None = None
    rejected_by: str | None = None
    # Set by the version's observers (gateway/observability/observed_runtime.py).
    infer_span: trace.Span | None = None
    enqueued: float = 0.0
    enqueued_ns: int = 0
    dispatched: float | None = None
    dispatched_ns: int | None = None
    queue_s: float | None = None
    compute_s: float | None = None
    batch_rows: int | None = None
