"""ModelStreamInfer's side of observation: the stream's span, and for each message an
observation with its own span (linked to the stream's) under protocol grpc_stream, closed with
the message's code (gateway/observability/edge_observer.py counts, ends the span and logs)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind, Status, StatusCode

from gateway.errors import QuotaExceededError, limit_of
from gateway.observability.access_log import AccessLog
from gateway.observability.edge_observer import EdgeObserver, server_error
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import ATTR_TENANT, SAMPLING_MODEL, Tracing
from gateway.request.observation import Observation

METHOD: Final = "ModelStreamInfer"
STREAM_SPAN: Final = "inference.GRPCInferenceService/ModelStreamInfer"
MESSAGE_SPAN: Final = "inference.GRPCInferenceService/ModelStreamInfer message"
PROTOCOL: Final = "grpc_stream"

Metadata = Sequence[tuple[str, str | bytes]]


class StreamTrace:
    """One stream's trace state: the caller's context (from the stream's metadata) and the
    stream's own span, which every message span links to."""

    __slots__ = ("parent", "span")

    def __init__(self, parent: otel_context.Context, span: trace.Span) -> None:
        self.parent = parent
        self.span = span


class StreamObserver:
    def __init__(
        self, metrics: Metrics, tracing: Tracing | None, access_log: AccessLog | None
    ) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._edge = EdgeObserver(metrics, tracing, access_log)

    # -- the stream ----------------------------------------------------------------------

    def open_stream(self, metadata: Metadata, tenant: str) -> StreamTrace | None:
        tracing = self._tracing
        if tracing is None:
            return None
        parent = tracing.extract(metadata)
        span = tracing.tracer.start_span(
            STREAM_SPAN, context=parent, kind=SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
                        "rpc.method": METHOD, ATTR_TENANT: tenant})
        return StreamTrace(parent, span)

    def refused_stream(self, tenant: str, error: QuotaExceededError) -> None:
        """Count a stream the tenant's quota refused as it opened (its ``streams``)."""
        self._metrics.count_quota_rejection(tenant, limit_of(error))

    @staticmethod
    def close_stream(stream: StreamTrace | None, code: str, messages: int) -> None:
        if stream is None:
            return
        span = stream.span
        if span.is_recording():
            span.set_attribute("modelgate.stream.messages", messages)
            failed = server_error(code)
            if failed is not None:
                span.set_status(Status(StatusCode.ERROR, failed))
        span.end()

    # -- one message ---------------------------------------------------------------------

    def open_message(self, stream: StreamTrace | None, tenant: str,
                     traceparent: str | None, model: str = "") -> Observation:
        """A message's observation; its span is a child of the message's own traceparent if
        it carries one, else of the stream's caller context, and links to the stream span.
        The span is made current in the calling task (each message runs in its own)."""
        observation = Observation(METHOD, time.perf_counter(), PROTOCOL, tenant=tenant)
        tracing = self._tracing
        if tracing is None or stream is None:
            return observation
        parent = (tracing.extract((("traceparent", traceparent),)) if traceparent
                  else stream.parent)
        attributes: dict[str, str] = {"rpc.system": "grpc", "rpc.method": METHOD,
                                      ATTR_TENANT: tenant}
        if model:  # the sampler applies the model's trace settings
            attributes[SAMPLING_MODEL] = model
        self._edge.start_span(observation, MESSAGE_SPAN, parent, dict(attributes),
                        (Link(stream.span.get_span_context()),))
        return observation

    def close_message(self, observation: Observation, code: str, error: BaseException | None,
                      peer: str, asked: tuple[str, str]) -> None:
        """Close one answered message's observation; ``asked`` is the model and version the
        message named (logged when it never resolved)."""
        attributes = (None if observation.span is None
                      else {"rpc.grpc.status_code": grpc.StatusCode[code].value[0]})
        self._edge.close(observation, code, error, peer, asked, attributes=attributes)
