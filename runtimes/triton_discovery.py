"""Discovery of the models Triton upstreams export (``export=all``): RepositoryIndex, then each
model's ModelConfig, kept fresh in the background and merged into the store's models."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path

import grpc

from model_store.config import spec_from_config
from model_store.errors import InvalidModelNameError, ModelConfigError
from model_store.repository import ModelRepository, StoredModel
from model_store.spec import validate_model_name
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import model_config_pb2 as mc
from runtimes.triton_runtime import PARAM_REMOTE_MODEL, PARAM_UPSTREAM, PLATFORM
from runtimes.upstreams import Upstream, UpstreamPool

log = logging.getLogger(__name__)

OnChange = Callable[[set[str]], Awaitable[None]]


def exported_config(remote: mc.ModelConfig, upstreams: list[str]) -> mc.ModelConfig:
    """The gateway's config of a model an upstream exports: its signature as the upstream
    declares it, served by the Triton runtime. Scheduling stays upstream: the upstream's
    dynamic batcher, instances and warm-up are its own, so the gateway adds none of them."""
    config = mc.ModelConfig()
    config.CopyFrom(remote)
    config.platform = ""
    config.backend = PLATFORM
    for name in ("dynamic_batching", "sequence_batching", "ensemble_scheduling",
                 "version_policy"):
        config.ClearField(name)
    del config.instance_group[:]
    del config.model_warmup[:]
    config.parameters.clear()
    config.parameters[PARAM_UPSTREAM].string_value = ",".join(upstreams)
    config.parameters[PARAM_REMOTE_MODEL].string_value = remote.name
    return config


class TritonDiscovery:
    """The models the export upstreams serve, as StoredModels. A model several upstreams
    export is one model balanced over all of them (its config read from the first)."""

    def __init__(self, pool: UpstreamPool, interval_s: float = 10.0) -> None:
        self._pool = pool
        self._interval = interval_s
        self._models: dict[str, StoredModel] = {}
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return any(c.export for c in self._pool.configs.values())

    def models(self) -> Mapping[str, StoredModel]:
        """The latest snapshot (read by the repository scan, off the event loop)."""
        return self._models

    async def refresh(self) -> set[str]:
        """Ask every healthy export upstream what it serves; returns the names whose
        declaration changed (appeared, vanished, other versions or upstreams). An upstream
        that cannot be asked keeps its models as they were until it answers again."""
        found: dict[str, dict[int, list[str]]] = {}
        configs: dict[str, mc.ModelConfig] = {}
        unreachable: set[str] = set()
        for upstream in sorted(self._exporting(), key=lambda u: u.name):
            try:
                index = await self._index(upstream)
                for name, numbers in index.items():
                    if name not in configs:
                        configs[name] = await self._config(upstream, name)
                    for version in numbers:
                        found.setdefault(name, {}).setdefault(version, []).append(upstream.name)
            except grpc.aio.AioRpcError as exc:
                log.warning("cannot list the models of upstream %s: %s", upstream.name,
                            exc.details())
                unreachable.add(upstream.name)
        fresh = {name: self._stored(name, configs[name], v) for name, v in found.items()}
        for name, old in self._models.items():
            if name not in fresh and self._from(old) & unreachable:
                fresh[name] = old
        changed = {
            n for n in set(fresh) | set(self._models)
            if _key(fresh.get(n)) != _key(self._models.get(n))
        }
        self._models = fresh
        return changed

    def _exporting(self) -> list[Upstream]:
        return [u for u in self._pool.upstreams.values() if u.config.export and u.healthy]

    @staticmethod
    async def _index(upstream: Upstream) -> dict[str, list[int]]:
        response = await upstream.stub.RepositoryIndex(
            pb.RepositoryIndexRequest(ready=True), timeout=10
        )
        index: dict[str, list[int]] = {}
        for entry in response.models:
            if entry.state == "READY" and entry.version.isdigit():
                index.setdefault(entry.name, []).append(int(entry.version))
        return index

    @staticmethod
    async def _config(upstream: Upstream, name: str) -> mc.ModelConfig:
        response = await upstream.stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=10)
        config: mc.ModelConfig = response.config
        config.name = config.name or name
        return config

    @staticmethod
    def _stored(name: str, remote: mc.ModelConfig, versions: dict[int, list[str]]) -> StoredModel:
        upstreams = sorted({u for names in versions.values() for u in names})
        try:
            validate_model_name(name)
            spec = spec_from_config(exported_config(remote, upstreams))
        except (ModelConfigError, InvalidModelNameError) as exc:
            log.warning("upstream model %r cannot be served: %s", name, exc)
            return StoredModel(name=name, spec=None, error=f"upstream model: {exc}")
        numbers = tuple(sorted(versions))
        # No file backs a remote version; the path only names where it comes from.
        files = {v: Path("triton:", upstreams[0], name, str(v)) for v in numbers}
        return StoredModel(name=name, spec=spec, versions=numbers, version_files=files)

    @staticmethod
    def _from(model: StoredModel) -> set[str]:
        if model.spec is None:
            return set()
        return set(model.spec.parameters.get(PARAM_UPSTREAM, "").split(","))

    def start(self, on_change: OnChange) -> None:
        """Refresh every interval in the background; ``on_change`` gets the changed names."""
        if self.enabled and self._task is None:
            self._task = asyncio.create_task(self._run(on_change), name="triton-discovery")

    async def _run(self, on_change: OnChange) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                changed = await self.refresh()
                if changed:
                    log.info("upstream models changed: %s", ", ".join(sorted(changed)))
                    await on_change(changed)
            except Exception:  # a failed refresh must not end refreshing
                log.exception("refreshing the upstreams' models failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


def _key(model: StoredModel | None) -> object:
    if model is None:
        return None
    params = dict(model.spec.parameters) if model.spec is not None else {}
    return (model.versions, model.error, tuple(sorted(params.items())),
            model.spec.config if model.spec is not None else b"")


class StoreWithUpstreams(ModelRepository):
    """The model store plus the models export upstreams serve. A store model wins over an
    upstream model of the same name."""

    def __init__(self, root: Path, discovery: TritonDiscovery) -> None:
        super().__init__(root)
        self.discovery = discovery

    def scan(self) -> dict[str, StoredModel]:
        local = super().scan()
        for name, model in self.discovery.models().items():
            if name in local:
                log.warning("model %s is in the store and on an upstream; serving the store's",
                            name)
                continue
            local[name] = model
        return local
