"""The model manager: reconciles what the store declares into served versions (load, warm
up, mark ready, route; drain, unload) and tracks each version's lifecycle state. Lookup,
leases and the shadow mirror are its ModelRegistry base's (gateway/models/registry.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Final

from gateway.errors import ModelNotReadyError, unknown_model
from gateway.models.registry import ModelRegistry
from gateway.models.routing import Router, RoutingTable
from gateway.models.served import Lease, ServedModel, ServedVersion, VersionState
from gateway.models.version_loader import RuntimeFactory, VersionLoader, unload_quietly
from model_store.errors import InvalidModelNameError, StoreError
from model_store.labels import RoutingSpec, read_routing
from model_store.repository import ModelRepository, StoredModel
from model_store.snapshot import Fingerprint, fingerprint
from model_store.spec import ModelId, validate_model_name

# Re-exported: the servicer, server and metrics know these as the manager's types.
__all__ = [
    "UNLOADED", "Lease", "ModelManager", "RuntimeFactory", "ServedModel", "ServedVersion",
    "VersionState",
]

log = logging.getLogger(__name__)

ChangeListener = Callable[[], Awaitable[None]]

UNLOADED: Final = "unloaded by RepositoryModelUnload"


@dataclass(frozen=True, slots=True)
class _Declared:
    """One model as the store declares it right now, read off the event loop."""

    entry: StoredModel | None
    routing: RoutingSpec | None
    routing_error: str | None
    fingerprints: Mapping[int, Fingerprint | None]


class ModelManager(ModelRegistry):
    """Owns every served version: what the store declares, loaded, routed and drained."""

    def __init__(
        self, repository: ModelRepository, factory: RuntimeFactory,
        router: Router | None = None,
    ) -> None:
        super().__init__(router)
        self._repository = repository
        self._loader = VersionLoader(factory)
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        self._listeners: list[ChangeListener] = []
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
        try:
            validate_model_name(name)
        except InvalidModelNameError:
            raise unknown_model(name) from None
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

    def ready(self) -> bool:
        """True once the initial load finished (reloads later do not make the server
        unready: the versions being replaced keep serving)."""
        return self.started
