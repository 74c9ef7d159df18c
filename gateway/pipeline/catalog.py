"""What a tenant may learn about the server and the served models, transport-free: server
metadata (the one list of extensions served), model metadata, config, readiness, statistics
and the repository index (what ServerMetadata, ModelMetadata, ModelConfig, ModelReady,
ModelStatistics and RepositoryIndex answer, whatever the transport)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from importlib import metadata as package_metadata
from typing import Final

from gateway.errors import GatewayError, ModelNotFoundError, ModelNotReadyError
from gateway.models.registry import ModelRegistry
from gateway.models.resolver import visible_target
from gateway.models.served import ServedModel, ServedVersion, VersionState
from gateway.observability.statistics import StatisticsSnapshot
from gateway.sanitize import strip_paths
from gateway.tenancy.tenants import Tenant
from model_store.spec import ModelSpec

# The Triton protocol extensions both transports serve, by Triton's names: exactly those
# implemented, for ServerMetadata.extensions on gRPC and GET /v2 over REST. An extension
# that lands adds its name here and nowhere else.
EXTENSIONS: Final = (
    "model_configuration", "model_repository", "binary_tensor_data", "parameters",
    "statistics", "schedule_policy", "classification", "trace", "logging",
    "system_shared_memory",
)
SERVER_NAME: Final = "modelgate"
# Triton extensions not served, by the name prefix of their methods (CudaSharedMemory-
# Status, ...): both transports answer them UNIMPLEMENTED / 501 naming the extension.
NOT_SERVED: Final = {"CudaSharedMemory": "cuda_shared_memory", "ModelGenerate": "generate"}


def not_served(method: str) -> str:
    """Why ``method`` (a gRPC method name) is not answered: the message of its refusal."""
    extension = next((e for prefix, e in NOT_SERVED.items() if method.startswith(prefix)),
                     None)
    what = f"{method} (the {extension} extension)" if extension else method
    return f"{what} is not implemented by modelgate"


@dataclass(frozen=True, slots=True)
class ServerInfo:
    """What ServerMetadata answers."""

    name: str
    version: str
    extensions: tuple[str, ...]


@cache
def server_info() -> ServerInfo:
    """The server's name, the installed package's version and the extensions served."""
    try:
        version = package_metadata.version("modelgate")
    except package_metadata.PackageNotFoundError:  # a source tree without install
        version = "0.0.0"
    return ServerInfo(SERVER_NAME, version, EXTENSIONS)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One declared input or output, with its full shape (-1 for variable dimensions)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A model's metadata as a tenant sees it (only the versions it may use)."""

    name: str
    versions: tuple[str, ...]
    platform: str
    inputs: tuple[TensorInfo, ...]
    outputs: tuple[TensorInfo, ...]


@dataclass(frozen=True, slots=True)
class Readiness:
    """Whether a version takes requests now; ``reason`` (path-trimmed) says why not."""

    ready: bool
    reason: str = ""


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One row of the repository index (``version`` '' for a model with no version)."""

    name: str
    version: str
    state: str
    reason: str


class Catalog:
    """Answers the model-information requests of one tenant over the served models."""

    __slots__ = ("_models",)

    def __init__(self, models: ModelRegistry) -> None:
        self._models = models

    def metadata(self, tenant: Tenant, name: str, version: str) -> ModelInfo:
        """The model's inputs, outputs, platform and the versions ``tenant`` may use."""
        model, spec = self._described(tenant, name, version)
        return ModelInfo(
            name=model.name,
            versions=tuple(
                str(v) for v in tenant.visible_versions(model.name, sorted(model.versions))
            ),
            platform=spec.platform or spec.backend,
            inputs=tuple(TensorInfo(t.name, t.datatype.value, tuple(spec.full_shape(t)))
                         for t in spec.inputs),
            outputs=tuple(TensorInfo(t.name, t.datatype.value, tuple(spec.full_shape(t)))
                          for t in spec.outputs),
        )

    def config(self, tenant: Tenant, name: str, version: str) -> ModelSpec:
        """The model's spec; its ``config`` holds the serialized model configuration."""
        return self._described(tenant, name, version)[1]

    def readiness(self, tenant: Tenant, name: str, version: str) -> Readiness:
        """Like Triton, an unknown model is simply not ready (clients expect a boolean, not
        an error); the reason says why."""
        try:
            served = self._models.version(name, version, tenant=tenant)
        except GatewayError as exc:
            return Readiness(False, strip_paths(str(exc)))
        reason = strip_paths(served.reason) if served.state is not VersionState.READY else ""
        # A remote (Triton) version is ready only while an upstream has it ready.
        runtime = served.runtime
        ready = served.state is VersionState.READY and (runtime is None or runtime.ready())
        return Readiness(ready, reason)

    def statistics(self, tenant: Tenant, name: str, version: str) -> list[StatisticsSnapshot]:
        """Like Triton: every ready version of every model, of one model, or one version."""
        if name:
            visible_target(tenant, name, version)
        versions: list[ServedVersion]
        if version:
            versions = [self._models.version(name, version)]
        else:
            models = [self._models.model(name)] if name else self._models.models()
            versions = [
                v for m in models for _, v in sorted(m.versions.items())
                if v.state is VersionState.READY
                and tenant.visible_versions(v.id.name, [v.id.version])
            ]
            if name and not versions:
                self._models.version(name, "")  # raises: no ready version
        for served in versions:
            if served.state is not VersionState.READY:
                raise ModelNotReadyError(
                    f"model '{served.id.name}' version {served.id.version} is "
                    f"{served.state.value.lower()}"
                )
        return [v.statistics.snapshot() for v in versions if v.statistics is not None]

    def index(self, tenant: Tenant, repository: str = "", ready_only: bool = False
              ) -> list[IndexEntry]:
        """Every model and version ``tenant`` may see, with its state and reason."""
        if repository:
            raise ModelNotFoundError(
                "this server has one model repository; leave repository_name empty"
            )
        entries: list[IndexEntry] = []
        for model in self._models.models():
            if not tenant.can_see(model.name):
                continue  # another tenant's model: not even its name is shown
            visible = set(tenant.visible_versions(model.name, list(model.versions)))
            for entry in _index_entries(model):
                if entry.version and int(entry.version) not in visible:
                    continue
                if not ready_only or entry.state == VersionState.READY.value:
                    entries.append(entry)
        return entries

    def _described(
        self, tenant: Tenant, name: str, version: str
    ) -> tuple[ServedModel, ModelSpec]:
        visible_target(tenant, name, version)
        model = self._models.model(name)
        if version:
            self._models.version(name, version)
        spec = model.spec
        if spec is None:
            self._models.version(name, "")  # raises with the model's error
            raise ModelNotReadyError(f"model '{name}' cannot be served")
        return model, spec


def _index_entries(model: ServedModel) -> list[IndexEntry]:
    # Reasons quote load errors, which name files by absolute path: clients get the name.
    if model.error is not None or not model.versions:
        reason = model.error or "no version to serve"
        return [IndexEntry(model.name, "", VersionState.UNAVAILABLE.value, strip_paths(reason))]
    return [
        IndexEntry(model.name, str(n), v.state.value, strip_paths(v.reason))
        for n, v in sorted(model.versions.items())
    ]
