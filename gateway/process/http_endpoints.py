"""The metrics port of one serving process: /metrics (Prometheus text format), /healthz
(live), /readyz (ready) and the drift reports, a route table on the REST port's HTTP stack."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from gateway.http.connection import Limits
from gateway.http.listener import HttpListener, port_limits
from gateway.http.messages import HttpRequest, HttpResponse
from gateway.http.route_table import Endpoint, RouteTable, alive, not_found
from gateway.models.manager import ModelManager, VersionState
from gateway.monitoring.endpoint import JSON_TYPE, DriftEndpoint, encode
from gateway.observability.metrics import CONTENT_TYPE, Metrics
from gateway.process.frontend import BindError, Services, address
from gateway.sanitize import strip_paths

# Readiness: (ready, details for the body).
ReadinessCheck = Callable[[], tuple[bool, dict[str, object]]]


class HttpEndpoints:
    """Serves GET/HEAD of /metrics, /healthz, /readyz and (with ``drift``) the drift paths
    under /v2/models/; anything else is 404 or 405."""

    def __init__(self, metrics: Metrics, readiness: ReadinessCheck, limits: Limits,
                 drift: DriftEndpoint | None = None) -> None:
        self._metrics = metrics
        self._readiness = readiness
        routes = RouteTable({"/metrics": self._scrape, "/healthz": alive,
                             "/readyz": self._ready},
                            [("/v2/models/", _drift_reports(drift))] if drift is not None else [])
        self._listener = HttpListener(routes.handle, limits)
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (``port`` 0 picks a free one). Raises
        OSError when the address cannot be bound."""
        self.port = await self._listener.start(host, port, reuse_port=False)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self._listener.stop(grace)

    async def _scrape(self, request: HttpRequest) -> HttpResponse:
        # Collecting walks every family and reads /proc; keep it off the event loop.
        return HttpResponse(200, await asyncio.to_thread(self._metrics.exposition),
                            CONTENT_TYPE)

    async def _ready(self, request: HttpRequest) -> HttpResponse:
        ready, details = self._readiness()
        body = json.dumps({"ready": ready, **details}, sort_keys=True).encode() + b"\n"
        return HttpResponse(200 if ready else 503, body, JSON_TYPE)


def _drift_reports(drift: DriftEndpoint) -> Endpoint:
    """The endpoint of the drift paths (anything else under the prefix is 404)."""

    async def report(request: HttpRequest) -> HttpResponse:
        # A report merges windows of every feature; keep it off the event loop.
        answer = await asyncio.to_thread(drift.answer, request.path, request.query)
        if answer is None:
            return not_found()
        return HttpResponse(answer[0], encode(answer[1]), JSON_TYPE)

    return report


def manager_readiness(manager: ModelManager, draining: Callable[[], bool]) -> ReadinessCheck:
    """Ready when loading finished, the gateway is not draining, and every version the store
    says should be served is READY (Triton's strict readiness); the body names the others."""

    def check() -> tuple[bool, dict[str, object]]:
        if draining():
            return False, {"reason": "shutting down"}
        if not manager.started:
            return False, {"reason": "loading models"}
        not_ready: dict[str, str] = {}
        for model in manager.models():
            # The reasons gRPC clients see: load errors quote paths, the probe gets file names.
            if model.error is not None:
                not_ready[model.name] = strip_paths(model.error)
            for number, version in sorted(model.versions.items()):
                name = f"{model.name}/{number}"
                if version.state is not VersionState.READY:
                    state = version.state.value
                    reason = strip_paths(version.reason) if version.reason else ""
                    not_ready[name] = f"{state}: {reason}" if reason else state
                elif version.runtime is not None and not version.runtime.ready():
                    not_ready[name] = "READY here, but no upstream has it ready"
        return not not_ready, {"not_ready": not_ready}

    return check


class MetricsFrontend:
    """The metrics port as a frontend: settings.metrics_port, or in a supervisor's worker a
    free loopback port its supervisor scrapes (serving the merged samples itself)."""

    def __init__(self, services: Services) -> None:
        self._services = services
        self.endpoints = HttpEndpoints(
            services.metrics, manager_readiness(services.manager, services.draining),
            port_limits(services.settings, max_body_bytes=0), services.drift,
        )

    @property
    def port(self) -> int:
        return self.endpoints.port

    async def start(self) -> None:
        settings = self._services.settings
        host, port = settings.host, settings.metrics_port
        if self._services.worker_index is not None:
            host, port = "127.0.0.1", 0
        try:
            await self.endpoints.start(host, port)
        except OSError as exc:
            raise BindError(
                "metrics_port", f"cannot bind {address(settings.host, port)}: {exc}"
            ) from exc

    async def stop(self, grace: float) -> None:
        await self.endpoints.stop(grace)
