"""Helpers over a request's observation (gateway/request/observation.py): child spans around
one step, and naming the tenant on the observation and its span."""

from __future__ import annotations

import contextlib
from typing import Final

from gateway.observability.tracing import ATTR_TENANT
from gateway.request.observation import Observation

_UNTRACED: Final = contextlib.nullcontext()


def set_tenant(record: Observation | None, tenant_id: str) -> None:
    """The authenticated tenant (its id, never its key) on the observation and its span."""
    if record is not None:
        record.tenant = tenant_id
        if record.span is not None and record.span.is_recording():
            record.span.set_attribute(ATTR_TENANT, tenant_id)


def stage(record: Observation | None, name: str) -> contextlib.AbstractContextManager[object]:
    """A child span of the request's span around one step (auth, quota, ...). Costs two
    attribute reads when tracing is off."""
    span = record.span if record is not None else None
    if record is None or record.tracer is None or span is None or not span.is_recording():
        return _UNTRACED  # tracing off, or this request was sampled out
    return record.tracer.start_as_current_span(name, record_exception=True)
