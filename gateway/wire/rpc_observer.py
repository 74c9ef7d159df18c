"""The unary RPC's side of observation: opens each inference RPC's observation with the gRPC
span attributes and trace-id trailer, and closes it with the RPC's status code and peer
(gateway/observability/edge_observer.py counts, ends the span and logs)."""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, TypeAlias

import grpc
from opentelemetry.util.types import AttributeValue

from gateway.errors import LIMIT_KEY
from gateway.observability.access_log import AccessLog
from gateway.observability.edge_observer import EdgeObserver
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import TRACE_ID_KEY, Tracing
from gateway.request.observation import Observation

Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


@functools.cache
def _split(method: str) -> tuple[str, str]:
    # Only registered method names get here, so the cache stays as small as the API.
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _peer_address(peer: str) -> tuple[str, int | None]:
    # grpc peers look like ipv4:127.0.0.1:5555, ipv6:[::1]:5555 or unix:/path.
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, _, port = rest.rpartition(":")
        return host.strip("[]"), int(port) if port.isdigit() else None
    return rest or peer, None


def _status_code(context: Context, error: BaseException | None) -> grpc.StatusCode:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if error is None:
        return grpc.StatusCode.OK
    if isinstance(error, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcObserver:
    """Observes every unary RPC of the inference service (health and reflection are left
    alone: probes would drown the data). The edge opens an observation before any other
    check runs, so it sees what the in-flight cap and auth answer, and closes it when the
    RPC ends."""

    def __init__(
        self, metrics: Metrics, tracing: Tracing | None, access_log: AccessLog | None
    ) -> None:
        self._edge = EdgeObserver(metrics, tracing, access_log)

    def open(
        self, method: str, context: Context, metadata: tuple[tuple[str, Any], ...] | None = None,
        request: Any = None,
    ) -> tuple[Observation, tuple[tuple[str, str], ...]]:
        """Open the observation (and span) of one RPC; returns it with the trailers every
        answer of the RPC carries (the trace id when tracing is on). ``metadata``: the
        call's, if the caller has read it already; ``request``: the RPC's message, whose
        model's trace settings decide the sampling (read only when tracing is on)."""
        service, name = _split(method)
        edge = self._edge
        if edge.tracing is None:
            return Observation(name, time.perf_counter()), ()
        model = getattr(request, "model_name", None)
        if metadata is None:
            metadata = tuple(context.invocation_metadata() or ())
        observation = edge.open(
            name, "grpc", metadata, method.lstrip("/"),
            {"rpc.system": "grpc", "rpc.service": service, "rpc.method": name},
            model=model if isinstance(model, str) else None)
        ours = ((TRACE_ID_KEY, observation.trace_id or ""),)
        context.set_trailing_metadata(ours)
        return observation, ours

    def close(
        self, observation: Observation, context: Context, request: Any,
        error: BaseException | None,
    ) -> None:
        """Close one finished RPC's observation with its status code."""
        code = _status_code(context, error)
        code_name = code.name
        limit = _named_limit(context) if code is grpc.StatusCode.RESOURCE_EXHAUSTED else None
        span = observation.span
        edge = self._edge
        # The peer is only worth its lookup when a span or a log line will carry it.
        peer = context.peer() if span is not None or edge.access_log is not None else ""
        attributes: dict[str, AttributeValue] | None = None
        if span is not None:
            host, port = _peer_address(peer)
            attributes = {"rpc.grpc.status_code": code.value[0], "network.peer.address": host}
            if port is not None:
                attributes["network.peer.port"] = port
        # What the request asked for goes only into the access log: read it only for one.
        asked = _asked(request) if edge.access_log is not None else _NOT_ASKED
        edge.close(observation, code_name, error, peer, asked, attributes=attributes,
                   limit=limit)


def _named_limit(context: Context) -> str | None:
    """The quota's trailer the answer carries (a quota rejection, not a full queue): the
    modelgate-limit trailer is part of the wire contract."""
    for key, value in context.trailing_metadata() or ():
        if key == LIMIT_KEY:
            return str(value)
    return None


_NOT_ASKED: tuple[str | None, str | None] = (None, None)


def _asked(request: Any) -> tuple[str | None, str | None]:
    """The model and version the request named, if it names any."""
    if request is None:
        return None, None
    model = getattr(request, "model_name", None) or getattr(request, "name", None)
    version = getattr(request, "model_version", None) or getattr(request, "version", None)
    return model, version
