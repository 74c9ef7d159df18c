"""Chooses the Runtime for a model's platform from the runtime registry and wraps it as its
config asks (statistics, the dynamic batcher for dynamic_batching models, metrics, tracing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.batching.batcher import DynamicBatcher
from gateway.models.version_loader import RuntimeStack
from gateway.observability.metrics import Metrics
from gateway.observability.observed_runtime import ExecutionObserver, RequestObserver
from gateway.observability.statistics import ModelStatistics, StatisticsRuntime
from gateway.observability.tracing import Tracing
from model_store.platforms import ONNX, PLATFORMS, TRITON, Platform, PlatformRegistry
from model_store.spec import ModelId, ModelSpec
from runtimes.base import Runtime
from runtimes.errors import ModelLoadError
from runtimes.onnx_runtime import OnnxOptions, OnnxRuntime
from runtimes.triton_runtime import TritonRoute, TritonRuntime
from runtimes.upstreams import UpstreamPool

# Builds one version's bare runtime (not yet loaded) from its id, spec and model file.
RuntimeBuilder = Callable[[ModelId, ModelSpec, Path], Runtime]


class RuntimeRegistry:
    """Runtime builders keyed by runtime kind (model_store/platforms.py says which config
    platform or backend selects which kind). A new runtime is one ``register`` call."""

    def __init__(self, platforms: PlatformRegistry | None = None) -> None:
        # A private copy: registering a kind here never changes what other registries know.
        self._platforms = (platforms or PLATFORMS).copy()
        self._builders: dict[str, RuntimeBuilder] = {}

    def register(self, platform: Platform, build: RuntimeBuilder) -> None:
        self._platforms.register(platform)
        self._builders[platform.kind] = build

    def build(self, model: ModelId, spec: ModelSpec, path: Path) -> Runtime:
        found = self._platforms.find(spec.platform, spec.backend)
        if found is None or found.kind not in self._builders:
            served = sorted(
                name for p in self._platforms if p.kind in self._builders
                for name in p.platforms | p.backends
            )
            raise ModelLoadError(
                f"unknown platform/backend '{spec.platform or spec.backend}' "
                f"(modelgate serves {', '.join(served)})"
            )
        return self._builders[found.kind](model, spec, path)


def builtin_runtimes(
    onnx: OnnxOptions, upstreams: UpstreamPool | None = None,
    in_flight: Callable[[], int] | None = None,
) -> RuntimeRegistry:
    """ONNX Runtime in-process and Triton upstreams, with the settings every model shares."""
    pool = upstreams or UpstreamPool(())
    registry = RuntimeRegistry()
    registry.register(ONNX, lambda model, spec, path: OnnxRuntime(
        model, spec, path, onnx, in_flight=in_flight))
    registry.register(TRITON, lambda model, spec, _path: TritonRuntime(
        model, spec, TritonRoute.from_spec(spec, model.version), pool))
    return registry


class RuntimeFactory:
    """Builds each version's runtime stack: the registry's runtime for its platform, wrapped
    in scheduling and observation."""

    def __init__(
        self, onnx: OnnxOptions, metrics: Metrics | None = None, tracing: Tracing | None = None,
        *, upstreams: UpstreamPool | None = None, in_flight: Callable[[], int] | None = None,
        staged_batches: int = 1, runtimes: RuntimeRegistry | None = None,
    ) -> None:
        self._runtimes = runtimes or builtin_runtimes(onnx, upstreams, in_flight)
        self._staged = staged_batches
        self._metrics = metrics
        self._tracing = tracing

    def __call__(self, model: ModelId, spec: ModelSpec, path: Path) -> RuntimeStack:
        return self._observed(self._runtimes.build(model, spec, path))

    def _observed(self, runtime: Runtime) -> RuntimeStack:
        """Metrics and tracing around the scheduling: one observer per execution below the
        batcher (it sees merged batches), one per request above it (which keeps the
        version's statistics too)."""
        if self._metrics is None:
            plain = with_scheduling(runtime, self._staged)
            return RuntimeStack(plain, plain.statistics)
        executions = ExecutionObserver(runtime, self._metrics, self._tracing)
        statistics = ModelStatistics(runtime.model)
        scheduled, batched = _scheduled(executions, statistics, self._staged)
        requests = RequestObserver(scheduled, statistics, not batched, self._metrics,
                                   self._tracing)
        return RuntimeStack(requests, statistics)


def with_scheduling(runtime: Runtime, staged_batches: int = 1) -> StatisticsRuntime:
    """Statistics around every runtime; the dynamic batcher in between when the config has
    a dynamic_batching block (else requests run as they come, instance_count at a time)."""
    statistics = ModelStatistics(runtime.model)
    scheduled, batched = _scheduled(runtime, statistics, staged_batches)
    return StatisticsRuntime(scheduled, statistics, records_executions=not batched)


def _scheduled(
    runtime: Runtime, statistics: ModelStatistics, staged_batches: int
) -> tuple[Runtime, bool]:
    """The runtime behind the dynamic batcher when its config asks for one (then True: the
    batcher records the executions), else as it is."""
    if runtime.spec.dynamic_batching is not None:
        return DynamicBatcher(runtime, statistics=statistics, staged=staged_batches), True
    return runtime, False
