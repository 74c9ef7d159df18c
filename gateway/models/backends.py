"""Chooses the Runtime for a model's platform and wraps it as its config asks (statistics,
the dynamic batcher for models with a dynamic_batching block, metrics and tracing)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from gateway.batching.batcher import DynamicBatcher
from gateway.models.version_loader import RuntimeStack
from gateway.observability.metrics import Metrics
from gateway.observability.observed_runtime import (
    ExecutionObserver,
    Observations,
    RequestObserver,
)
from gateway.observability.statistics import ModelStatistics, StatisticsRuntime
from gateway.observability.tracing import Tracing
from model_store.config import ONNX_BACKENDS, ONNX_PLATFORMS, is_remote
from model_store.spec import ModelId, ModelSpec
from runtimes.base import Runtime
from runtimes.errors import ModelLoadError
from runtimes.onnx_runtime import OnnxOptions, OnnxRuntime
from runtimes.triton_runtime import TritonRoute, TritonRuntime
from runtimes.upstreams import UpstreamPool


class RuntimeFactory:
    """Builds runtimes with the settings that apply to every model."""

    def __init__(
        self, onnx: OnnxOptions, metrics: Metrics | None = None, tracing: Tracing | None = None,
        *, upstreams: UpstreamPool | None = None, in_flight: Callable[[], int] | None = None,
        staged_batches: int = 1,
    ) -> None:
        self._onnx = onnx
        self._staged = staged_batches
        self._in_flight = in_flight
        self._upstreams = upstreams or UpstreamPool(())
        self._metrics = metrics
        self._tracing = tracing

    def __call__(self, model: ModelId, spec: ModelSpec, path: Path) -> RuntimeStack:
        if spec.platform in ONNX_PLATFORMS or spec.backend in ONNX_BACKENDS:
            return self._observed(
                OnnxRuntime(model, spec, path, self._onnx, in_flight=self._in_flight)
            )
        if is_remote(spec.platform, spec.backend):
            route = TritonRoute.from_spec(spec, model.version)
            return self._observed(TritonRuntime(model, spec, route, self._upstreams))
        kind = spec.platform or spec.backend
        raise ModelLoadError(
            f"unknown platform/backend '{kind}' (modelgate serves onnxruntime_onnx and triton)"
        )

    def _observed(self, runtime: Runtime) -> RuntimeStack:
        """Metrics and tracing around the scheduling: one observer per execution below the
        batcher (it sees merged batches), one per request above it."""
        if self._metrics is None:
            scheduled = with_scheduling(runtime, self._staged)
            return RuntimeStack(scheduled, scheduled.statistics)
        observations: Observations = {}
        executions = ExecutionObserver(runtime, self._metrics, self._tracing, observations)
        scheduled = with_scheduling(executions, self._staged)
        requests = RequestObserver(scheduled, self._metrics, self._tracing, observations)
        return RuntimeStack(requests, scheduled.statistics)


def with_scheduling(runtime: Runtime, staged_batches: int = 1) -> StatisticsRuntime:
    """Statistics around every runtime; the dynamic batcher in between when the config has
    a dynamic_batching block (else requests run as they come, instance_count at a time)."""
    statistics = ModelStatistics(runtime.model)
    if runtime.spec.dynamic_batching is not None:
        batcher = DynamicBatcher(runtime, statistics=statistics, staged=staged_batches)
        return StatisticsRuntime(batcher, statistics, records_executions=False)
    return StatisticsRuntime(runtime, statistics, records_executions=True)
