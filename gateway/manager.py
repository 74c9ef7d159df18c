"""The model manager: reconciles what the store declares into served versions, tracks each
version's lifecycle state, and resolves a request's (name, version) to a ready runtime."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gateway.errors import InvalidRequestError, ModelNotFoundError, ModelNotReadyError
from model_store.errors import InvalidModelNameError, StoreError
from model_store.repository import ModelRepository, StoredModel
from model_store.spec import ModelId, ModelSpec, validate_model_name
from runtimes.base import Runtime
from runtimes.errors import RuntimeFailure

log = logging.getLogger(__name__)

RuntimeFactory = Callable[[ModelId, ModelSpec, Path], Runtime]

_VERSION: Final = re.compile(r"[0-9]{1,18}|[A-Za-z][A-Za-z0-9_\-]{0,63}")
# Loading many models at once on a small machine only makes every one of them slow.
_LOAD_CONCURRENCY: Final = 4


class VersionState(enum.Enum):
    """A version's lifecycle state, with the names RepositoryIndex reports."""

    LOADING = "LOADING"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNAVAILABLE = "UNAVAILABLE"


@dataclass(slots=True)
class ServedVersion:
    """One version of a model and where it is in its lifecycle."""

    id: ModelId
    spec: ModelSpec
    state: VersionState = VersionState.LOADING
    reason: str = ""
    runtime: Runtime | None = None


@dataclass(slots=True)
class ServedModel:
    """A model of the store: its versions, or the reason it cannot be served at all."""

    name: str
    spec: ModelSpec | None
    error: str | None = None
    versions: dict[int, ServedVersion] = field(default_factory=dict)


class ModelManager:
    """Owns every served version. Resolution never touches the file system."""

    def __init__(self, repository: ModelRepository, factory: RuntimeFactory) -> None:
        self._repository = repository
        self._factory = factory
        self._models: dict[str, ServedModel] = {}
        self.started = False

    async def start(self) -> None:
        """Scan the store and load every version its policies select."""
        stored = await asyncio.to_thread(self._repository.scan)
        self._models = {name: self._plan(entry) for name, entry in stored.items()}
        gate = asyncio.Semaphore(_LOAD_CONCURRENCY)

        async def load(version: ServedVersion, path: Path) -> None:
            async with gate:
                await self._load(version, path)

        await asyncio.gather(
            *(
                load(version, stored[model.name].version_files[version.id.version])
                for model in self._models.values()
                for version in model.versions.values()
                if version.state is VersionState.LOADING
            )
        )
        self.started = True

    def _plan(self, entry: StoredModel) -> ServedModel:
        model = ServedModel(name=entry.name, spec=entry.spec, error=entry.error)
        if entry.spec is None:
            return model
        for number in entry.versions:
            version = ServedVersion(id=ModelId(entry.name, number), spec=entry.spec)
            if number in entry.version_errors:
                version.state = VersionState.UNAVAILABLE
                version.reason = entry.version_errors[number]
            model.versions[number] = version
        return model

    async def _load(self, version: ServedVersion, path: Path) -> None:
        try:
            runtime = self._factory(version.id, version.spec, path)
            await runtime.load()
        except (RuntimeFailure, StoreError) as exc:
            version.state = VersionState.UNAVAILABLE
            version.reason = str(exc)
            log.error("model %s failed to load: %s", version.id, exc)
            return
        version.runtime = runtime
        version.state = VersionState.READY
        log.info("model %s is ready", version.id)

    async def stop(self) -> None:
        """Unload every version; each finishes its in-flight requests first."""
        ready = [v for m in self._models.values() for v in m.versions.values() if v.runtime]
        for version in ready:
            version.state = VersionState.UNLOADING
        await asyncio.gather(*(v.runtime.unload() for v in ready if v.runtime))
        for version in ready:
            version.state = VersionState.UNAVAILABLE
            version.reason = "unloaded"
            version.runtime = None

    def models(self) -> list[ServedModel]:
        """Every model of the store, sorted by name."""
        return [self._models[name] for name in sorted(self._models)]

    def ready(self) -> bool:
        """True once loading finished and no model that should serve is still loading."""
        return self.started and all(
            v.state is not VersionState.LOADING
            for m in self._models.values()
            for v in m.versions.values()
        )

    def model(self, name: str) -> ServedModel:
        """The model called ``name``; NOT_FOUND for anything else, including invalid names."""
        try:
            validate_model_name(name)
        except InvalidModelNameError:
            raise ModelNotFoundError(f"unknown model '{_printable(name)}'") from None
        model = self._models.get(name)
        if model is None:
            raise ModelNotFoundError(f"unknown model '{name}'")
        return model

    def version(self, name: str, version: str) -> ServedVersion:
        """The version a request names, in whatever state it is: '' means the highest READY
        version; a number means exactly that version."""
        model = self.model(name)
        if model.error is not None:
            raise ModelNotReadyError(f"model '{name}' is unavailable: {model.error}")
        if not version:
            ready = [n for n, v in model.versions.items() if v.state is VersionState.READY]
            if not ready:
                raise ModelNotReadyError(f"model '{name}' has no ready version")
            return model.versions[max(ready)]
        if not _VERSION.fullmatch(version):
            raise InvalidRequestError(
                "model_version must be empty, a version number or a label "
                "([A-Za-z][A-Za-z0-9_-]*)"
            )
        if not version.isdigit():
            raise ModelNotFoundError(f"model '{name}' has no version label '{version}'")
        served = model.versions.get(int(version))
        if served is None:
            raise ModelNotFoundError(f"model '{name}' has no version {int(version)}")
        return served

    def resolve(self, name: str, version: str) -> tuple[ServedVersion, Runtime]:
        """The ready version a request runs on, with its runtime."""
        served = self.version(name, version)
        if served.state is not VersionState.READY or served.runtime is None:
            detail = f": {served.reason}" if served.reason else ""
            raise ModelNotReadyError(
                f"model '{name}' version {served.id.version} is {served.state.value.lower()}"
                f"{detail}"
            )
        return served, served.runtime


def _printable(text: str) -> str:
    """Names echoed in errors never carry control characters or unbounded length."""
    return text[:128].encode("unicode_escape").decode("ascii")
