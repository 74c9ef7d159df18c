"""The served-model value types: a version's lifecycle state, a model's versions and
routing, and the Lease a request holds on a version while it runs."""

from __future__ import annotations

import asyncio
import enum
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from gateway.models.routing import RoutingTable
from gateway.observability.statistics import ModelStatistics
from model_store.spec import ModelId, ModelSpec
from runtimes.base import Runtime


class VersionState(enum.Enum):
    """A version's lifecycle state, with the names RepositoryIndex reports."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True, eq=False)
class ServedVersion:
    """One version of a model and where it is in its lifecycle. ``inflight`` counts the
    leases held on it: an unloading version unloads its runtime only when it drops to 0."""

    id: ModelId
    spec: ModelSpec
    state: VersionState = VersionState.LOADING
    reason: str = ""
    runtime: Runtime | None = None
    fingerprint: object = None
    source: Path | None = None
    inflight: int = 0
    idle: asyncio.Event | None = None
    drain: asyncio.Task[None] | None = None
    statistics: ModelStatistics | None = None  # its runtime stack's, once loaded


@dataclass(slots=True, eq=False)
class ServedModel:
    """A model of the store: its versions and routing, or the reason it cannot be served.
    ``pinned`` models were unloaded by the repository API; polling leaves them alone."""

    name: str
    spec: ModelSpec | None
    error: str | None = None
    versions: dict[int, ServedVersion] = field(default_factory=dict)
    routing: RoutingTable = field(default_factory=RoutingTable)
    pinned: bool = False
    removed: bool = False


class Lease:
    """A request's hold on a ready version; release it (or leave the ``with`` block) when
    the request is done so a replaced version can finish draining. ``model`` is the served
    model the version belongs to (its routing and versions: what the shadow mirror reads)."""

    __slots__ = ("_released", "model", "runtime", "version")

    def __init__(
        self, version: ServedVersion, runtime: Runtime, model: ServedModel | None = None
    ) -> None:
        self.version = version
        self.runtime = runtime
        self.model = model
        self._released = False
        version.inflight += 1

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self.version.inflight -= 1
        if self.version.inflight == 0 and self.version.idle is not None:
            self.version.idle.set()

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
