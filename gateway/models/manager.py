"""The model manager: reconciles what the store declares into served versions (load, warm
up, mark ready, route; drain, unload), tracks each version's lifecycle state, and leases a
request the ready version its model name, version, label or routing key selects."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

from gateway.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    ModelNotReadyError,
    unknown_model,
)
from gateway.models.routing import (
    Router,
    RoutingTable,
    label_version,
    requested_target,
    split_version,
)
from gateway.models.served import Lease, ServedModel, ServedVersion, VersionState
from gateway.models.shadow import ShadowMirror
from gateway.models.version_loader import RuntimeFactory, VersionLoader, unload_quietly
from gateway.observability import observe
from model_store.errors import InvalidModelNameError, StoreError
from model_store.labels import RoutingSpec, read_routing
from model_store.repository import ModelRepository, StoredModel
from model_store.snapshot import Fingerprint, fingerprint
from model_store.spec import ModelId, validate_model_name
from runtimes.base import InferRequest, Tensor

# Re-exported: the servicer, server and metrics know these as the manager's types.
__all__ = [
    "UNLOADED", "Lease", "ModelManager", "RuntimeFactory", "ServedModel", "ServedVersion",
    "VersionState",
]

log = logging.getLogger(__name__)

ChangeListener = Callable[[], Awaitable[None]]

_VERSION: Final = re.compile(r"[0-9]{1,18}|[A-Za-z][A-Za-z0-9_\-]{0,63}")
UNLOADED: Final = "unloaded by RepositoryModelUnload"


@dataclass(frozen=True, slots=True)
class _Declared:
    """One model as the store declares it right now, read off the event loop."""

    entry: StoredModel | None
    routing: RoutingSpec | None
    routing_error: str | None
    fingerprints: Mapping[int, Fingerprint | None]


class ModelManager:
    """Owns every served version. Resolution never touches the file system."""

    def __init__(
        self, repository: ModelRepository, factory: RuntimeFactory,
        router: Router | None = None,
    ) -> None:
        self._repository = repository
        self._loader = VersionLoader(factory)
        self._router = router or Router()
        self._models: dict[str, ServedModel] = {}
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        self._listeners: list[ChangeListener] = []
        self.shadow = ShadowMirror()
        self.started = False

    # ---- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Scan the store and load every version its policies select."""
        await self.reconcile()
        self.started = True

    @property
    def load_failures(self) -> Mapping[str, int]:
        """Per model, how many version loads or warm-ups failed (for metrics)."""
        return self._loader.failures

    def add_listener(self, listener: ChangeListener) -> None:
        """Await ``listener`` after every change of what is served (health, metrics)."""
        self._listeners.append(listener)

    async def reconcile(self, names: Collection[str] | None = None, force: bool = False) -> None:
        """Bring the named models (all when None) to what the store declares. New or changed
        versions load and warm up before they replace anything; versions no longer declared
        drain in the background. ``force`` also retries versions that failed before and
        models unloaded by the repository API."""
        async with self._lock:
            declared = await asyncio.to_thread(self._read_store, names)
            await asyncio.gather(
                *(self._reconcile_model(name, d, force) for name, d in declared.items())
            )
        await self._notify()

    async def load_model(self, name: str) -> None:
        """The repository API's load: re-read the model from the store and serve it. Raises
        ModelNotFoundError when the store has no such model, ModelNotReadyError when a
        version failed to load (the versions that loaded serve regardless)."""
        self._check_name(name)
        if not (self._repository.root / name).is_dir():
            raise unknown_model(name)
        await self.reconcile([name], force=True)
        model = self._models.get(name)
        if model is None:
            raise unknown_model(name)
        if model.error is not None:
            raise ModelNotReadyError(f"model '{name}' failed to load: {model.error}")
        failed = [v for v in model.versions.values() if v.state is VersionState.UNAVAILABLE]
        if failed:
            detail = "; ".join(f"version {v.id.version}: {v.reason}" for v in failed)
            raise ModelNotReadyError(f"model '{name}' failed to load: {detail}")

    async def unload_model(self, name: str) -> None:
        """The repository API's unload: stop routing to every version of the model, let
        in-flight requests finish, unload. Polling leaves it unloaded until a load."""
        model = self.model(name)
        async with self._lock:
            model.pinned = True
            model.error = UNLOADED
            drains = [self._retire(model, v) for v in list(model.versions.values())]
        await self._notify()
        await asyncio.gather(*drains)
        await self._notify()

    async def stop(self) -> None:
        """Unload every version; each finishes its in-flight requests first."""
        self.started = False
        await self.shadow.close()
        async with self._lock:
            drains = [self._retire(m, v) for m in self._models.values()
                      for v in list(m.versions.values())]
        await asyncio.gather(*drains, *list(self._drains))

    # ---- reconciling -----------------------------------------------------------------

    def _read_store(self, names: Collection[str] | None) -> dict[str, _Declared]:
        stored = self._repository.scan()
        wanted = set(stored) | set(self._models) if names is None else set(names)
        declared: dict[str, _Declared] = {}
        for name in sorted(wanted):
            entry = stored.get(name)
            routing: RoutingSpec | None = None
            routing_error: str | None = None
            prints: dict[int, Fingerprint | None] = {}
            if entry is not None:
                try:
                    routing = read_routing(self._repository.root / name)
                except StoreError as exc:
                    routing_error = str(exc)
                for number, path in entry.version_files.items():
                    prints[number] = fingerprint(path.parent)
            declared[name] = _Declared(entry, routing, routing_error, prints)
        return declared

    async def _reconcile_model(self, name: str, declared: _Declared, force: bool) -> None:
        model = self._models.get(name)
        entry = declared.entry
        if entry is None:
            if model is not None:
                log.info("model %s left the store: unloading it", name)
                model.removed = True
                for version in list(model.versions.values()):
                    self._retire(model, version)
                self._forget_if_empty(model)
            return
        if model is None:
            model = self._models[name] = ServedModel(name=name, spec=entry.spec)
        elif model.pinned and not force:
            return
        model.pinned = model.removed = False
        serving = [v for v in model.versions.values() if v.state is VersionState.READY]
        if entry.spec is None:
            problem = entry.error or "the model cannot be served"
            if serving:
                log.error("model %s: %s; the versions already loaded keep serving", name, problem)
                for version in serving:
                    version.reason = f"serving the previous config: {problem}"
            else:
                model.error = problem
                model.spec = None
            return
        for version in serving:
            version.reason = ""  # notes of an earlier round; this round sets its own
        loads = self._plan(model, entry, declared.fingerprints, force)
        await asyncio.gather(*(self._loader.load(candidate) for candidate, _ in loads))
        for candidate, current in loads:
            self._install(model, candidate, current)
        desired = set(entry.versions)
        if not desired or any(
            v.state is VersionState.READY for n, v in model.versions.items() if n in desired
        ):
            model.spec = entry.spec
            model.error = entry.error if not desired else None
            for number, version in list(model.versions.items()):
                if number not in desired:
                    log.info("model %s is no longer declared: draining it", version.id)
                    self._retire(model, version)
        elif any(v.state is VersionState.READY for v in model.versions.values()):
            log.error("model %s: no declared version could load; the versions already "
                      "loaded keep serving", name)
        else:
            model.spec = entry.spec
            model.error = None if model.versions else entry.error
        self._apply_routing(model, declared)

    def _plan(
        self, model: ServedModel, entry: StoredModel,
        prints: Mapping[int, Fingerprint | None], force: bool,
    ) -> list[tuple[ServedVersion, ServedVersion | None]]:
        """The versions to (re)load, each with the version it replaces; failures that need
        no load (a missing model file) are recorded at once."""
        assert entry.spec is not None
        loads: list[tuple[ServedVersion, ServedVersion | None]] = []
        for number in entry.versions:
            current = model.versions.get(number)
            if number in entry.version_errors:
                if current is None or current.state is not VersionState.READY:
                    model.versions[number] = ServedVersion(
                        id=ModelId(model.name, number), spec=entry.spec,
                        state=VersionState.UNAVAILABLE, reason=entry.version_errors[number],
                    )
                continue
            mark = (entry.spec.config, prints.get(number))
            if current is not None and current.fingerprint == mark and (
                current.state in (VersionState.READY, VersionState.LOADING)
                or (current.state is VersionState.UNAVAILABLE and not force)
            ):
                continue
            candidate = ServedVersion(
                id=ModelId(model.name, number), spec=entry.spec, fingerprint=mark,
                source=entry.version_files[number],
            )
            if current is None or current.state is not VersionState.READY:
                model.versions[number] = candidate  # shows as LOADING meanwhile
            loads.append((candidate, current))
        return loads

    def _install(
        self, model: ServedModel, candidate: ServedVersion, current: ServedVersion | None
    ) -> None:
        """Route to a candidate that loaded (draining what it replaces); keep the current
        version serving when the candidate failed."""
        number = candidate.id.version
        if candidate.state is VersionState.READY:
            model.versions[number] = candidate
            if current is not None and current is not candidate:
                self._retire(model, current, forget=False)
        elif current is not None and current.state is VersionState.READY:
            current.reason = f"kept serving; its replacement failed: {candidate.reason}"
        else:
            model.versions[number] = candidate

    def _apply_routing(self, model: ServedModel, declared: _Declared) -> None:
        if declared.routing_error is not None:
            log.error("model %s: %s; the previous routing stays", model.name,
                      declared.routing_error)
            return
        if declared.routing is None:
            return
        try:
            table = RoutingTable.from_spec(declared.routing)
        except StoreError as exc:
            log.error("model %s: %s; the previous routing stays", model.name, exc)
            return
        if table != model.routing:
            log.info("model %s routing: labels %s, weights %s, shadow %s (%.0f%%)",
                     model.name, dict(table.labels), list(table.weights), table.shadow,
                     table.shadow_fraction * 100)
        model.routing = table

    def _retire(
        self, model: ServedModel, version: ServedVersion, forget: bool = True
    ) -> asyncio.Task[None]:
        """Stop routing to ``version`` now; drain and unload it in the background (once:
        retiring a version already draining returns its drain)."""
        if version.drain is not None:
            return version.drain
        task = asyncio.get_running_loop().create_task(self._drain(model, version, forget))
        version.drain = task
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)
        if version.state is not VersionState.UNAVAILABLE:
            version.state = VersionState.UNLOADING
        return task

    async def _drain(self, model: ServedModel, version: ServedVersion, forget: bool) -> None:
        while version.inflight:
            version.idle = asyncio.Event()
            await version.idle.wait()
        runtime, version.runtime = version.runtime, None
        if runtime is not None:
            await unload_quietly(runtime)
            version.state = VersionState.UNAVAILABLE
            version.reason = "unloaded"
            log.info("model %s drained and unloaded", version.id)
        if forget and model.versions.get(version.id.version) is version:
            del model.versions[version.id.version]
        self._forget_if_empty(model)

    def _forget_if_empty(self, model: ServedModel) -> None:
        if model.removed and not model.versions and self._models.get(model.name) is model:
            del self._models[model.name]

    async def _notify(self) -> None:
        for listener in self._listeners:
            try:
                await listener()
            except Exception:
                log.exception("model change listener failed")

    # ---- resolving -------------------------------------------------------------------

    def models(self) -> list[ServedModel]:
        """Every model of the store, sorted by name."""
        return [self._models[name] for name in sorted(self._models)]

    def ready(self) -> bool:
        """True once the initial load finished (reloads later do not make the server
        unready: the versions being replaced keep serving)."""
        return self.started

    def model(self, name: str) -> ServedModel:
        """The model called ``name``; NOT_FOUND for anything else, including invalid names."""
        model = self._models.get(name)
        if model is None:
            # Only store folder names are keys, so a found name is valid; a miss is checked
            # so that an invalid name gets the same NOT_FOUND as an unknown one.
            self._check_name(name)
            raise unknown_model(name)
        return model

    def version(self, name: str, version: str, label: str | None = None) -> ServedVersion:
        """The version a request names, in whatever state it is: '' means the highest READY
        version; a number means exactly that version; a label the version it points to."""
        model = self._serving_model(name)
        target = requested_target(version, label)
        if not target:
            return model.versions[self._highest_ready(model)]
        return self._named(model, target)

    def acquire(
        self, name: str, version: str = "", label: str | None = None, key: str | None = None
    ) -> Lease:
        """Lease the ready version a request runs on: a number, a label (in model_version or
        ``label``), or for neither the weighted split (sticky by ``key``), else the highest
        ready version."""
        model = self._serving_model(name)
        target = requested_target(version, label)
        if target:
            served = self._named(model, target)
        else:
            chosen: int | None = None
            if model.routing.weights:
                point = self._router.point(name, key)
                ready = [n for n, v in model.versions.items() if v.state is VersionState.READY]
                chosen = split_version(model.routing, ready, point)
            served = model.versions[chosen if chosen is not None else self._highest_ready(model)]
        if served.state is not VersionState.READY or served.runtime is None:
            detail = f": {served.reason}" if served.reason else ""
            raise ModelNotReadyError(
                f"model '{name}' version {served.id.version} is {served.state.value.lower()}"
                f"{detail}"
            )
        return Lease(served, served.runtime)

    def mirror(
        self, lease: Lease, request: InferRequest, outputs: Mapping[str, Tensor]
    ) -> None:
        """Mirror a request the primary answered to the model's shadow version, if its
        routing asks for one and this request is sampled. Never raises, never waits."""
        primary = lease.version.id
        model = self._models.get(primary.name)
        if model is None:
            return
        table = model.routing
        shadow = table.shadow
        if shadow is None or shadow == primary.version or not self._router.shadow_due(table):
            return
        target = model.versions.get(shadow)
        if target is None or target.state is not VersionState.READY:
            self.shadow.skip(primary.name, primary.version, shadow)
            return
        copy = InferRequest(
            inputs=request.inputs, outputs=request.outputs, rows=request.rows,
            priority=request.priority, tags={**request.tags, "shadow": True},
        )

        async def run() -> dict[str, Tensor]:
            with self.acquire(primary.name, str(shadow)) as shadow_lease:
                return await shadow_lease.runtime.infer(copy)

        record = observe.current()
        parent = (record.tracer, record.span) if record and record.tracer and record.span else None
        self.shadow.mirror(primary.name, primary.version, shadow, run, outputs, parent=parent)

    def _serving_model(self, name: str) -> ServedModel:
        model = self.model(name)
        if model.error is not None:
            raise ModelNotReadyError(f"model '{name}' is unavailable: {model.error}")
        return model

    @staticmethod
    def _highest_ready(model: ServedModel) -> int:
        highest = -1
        for number, version in model.versions.items():
            if number > highest and version.state is VersionState.READY:
                highest = number
        if highest < 0:
            raise ModelNotReadyError(f"model '{model.name}' has no ready version")
        return highest

    @staticmethod
    def _named(model: ServedModel, target: str) -> ServedVersion:
        if not _VERSION.fullmatch(target):
            raise InvalidRequestError(
                "model_version must be empty, a version number or a label "
                "([A-Za-z][A-Za-z0-9_-]*)"
            )
        number = int(target) if target.isdigit() else label_version(
            model.routing, model.name, target
        )
        served = model.versions.get(number)
        if served is None:
            via = f" (label '{target}')" if not target.isdigit() else ""
            raise ModelNotFoundError(f"model '{model.name}' has no version {number}{via}")
        return served

    @staticmethod
    def _check_name(name: str) -> None:
        try:
            validate_model_name(name)
        except InvalidModelNameError:
            raise unknown_model(name) from None
