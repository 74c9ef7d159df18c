"""The per-request observation record (tenant, model, rows, queue and compute time, span)
that the RPC interceptor opens and the servicer, auth, quota and runtime wrappers fill in."""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace

from gateway.observability.tracing import ATTR_TENANT
from model_store.spec import ModelId

# Reasons a request was rejected before it ran, as the hooks report them.
QUOTA: Final = "quota"


@dataclass(slots=True)
class RequestRecord:
    """What is known about one RPC so far. Filled in as the request moves through the
    gateway; read once by the interceptor when the RPC ends."""

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


_CURRENT: contextvars.ContextVar[RequestRecord | None] = contextvars.ContextVar(
    "modelgate_request", default=None
)


def current() -> RequestRecord | None:
    """The record of the RPC this task serves (None outside an observed RPC)."""
    return _CURRENT.get()


def begin(record: RequestRecord) -> contextvars.Token[RequestRecord | None]:
    """Make ``record`` the current one for this task (the interceptor's job)."""
    return _CURRENT.set(record)


def set_tenant(tenant_id: str) -> None:
    """Auth's hook: the authenticated tenant (its id, never its key)."""
    record = _CURRENT.get()
    if record is not None:
        record.tenant = tenant_id
        if record.span is not None and record.span.is_recording():
            record.span.set_attribute(ATTR_TENANT, tenant_id)


def set_model(model: ModelId) -> None:
    """The servicer's hook: the model version a request resolved to."""
    record = _CURRENT.get()
    if record is not None:
        record.model = model


def rejected(reason: str) -> None:
    """A hook for the stage that turned the request away (QUOTA for quota rejections)."""
    record = _CURRENT.get()
    if record is not None:
        record.rejected_by = reason


_UNTRACED: Final = contextlib.nullcontext()


def stage(name: str) -> contextlib.AbstractContextManager[object]:
    """A child span of the RPC span around one step (auth, quota, ...). Costs a context
    variable read when tracing is off."""
    record = _CURRENT.get()
    span = record.span if record is not None else None
    if record is None or record.tracer is None or span is None or not span.is_recording():
        return _UNTRACED  # tracing off, or this RPC was sampled out
    return record.tracer.start_as_current_span(name, record_exception=True)
