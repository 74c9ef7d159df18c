"""What a transport is to the serving process: a Frontend that starts (binds, then serves)
and stops within a grace period, built from the Services every transport shares."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from gateway.models.manager import ModelManager
from gateway.models.model_control import ModelControl
from gateway.monitoring.endpoint import DriftEndpoint
from gateway.observability.access_log import AccessLog
from gateway.observability.metrics import Metrics
from gateway.observability.tracing import Tracing
from gateway.pipeline.catalog import Catalog
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.server_settings import ServerSettings
from gateway.pipeline.shared_memory import SharedMemory
from gateway.request.inflight import InflightLimit
from gateway.settings import Settings
from gateway.tenancy.auth import Authenticator


class BindError(Exception):
    """A listening address could not be bound; `setting` names the port setting that chose it."""

    def __init__(self, setting: str, message: str) -> None:
        super().__init__(message)
        self.setting = setting


def address(host: str, port: int) -> str:
    """host:port, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Services:
    """The parts of one serving process that every transport shares, each built once:
    inference and what a tenant may learn (pipeline, catalog), who calls (authenticator),
    the in-flight cap, model control, drift reports, system shared memory, the trace and
    log settings, and what observes requests (metrics, tracing, access log).
    ``worker_index`` is set in a multi-worker supervisor's processes (ports are shared);
    ``draining`` says whether SIGTERM's drain has begun."""

    settings: Settings
    worker_index: int | None
    metrics: Metrics
    tracing: Tracing | None
    access_log: AccessLog | None
    manager: ModelManager
    pipeline: InferencePipeline
    catalog: Catalog
    inflight: InflightLimit
    authenticator: Authenticator
    control: ModelControl
    drift: DriftEndpoint
    shared_memory: SharedMemory
    server_settings: ServerSettings
    draining: Callable[[], bool]


class Frontend(Protocol):
    """One transport of the serving process (gRPC, REST, the metrics port, ...)."""

    async def start(self) -> None:
        """Bind and serve; raises BindError naming the setting whose address is taken.
        Models may still be loading: what answers then (health, liveness) must."""

    async def stop(self, grace: float) -> None:
        """Stop accepting; let what is in flight finish within ``grace`` seconds."""


# How a transport is added to a Gateway: built from the shared parts, once, at start-up.
FrontendFactory = Callable[[Services], Frontend]
