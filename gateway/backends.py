"""Chooses the Runtime for a model's platform and wraps it as its config asks (the
dynamic batcher for models with a dynamic_batching block)."""

from __future__ import annotations

from pathlib import Path

from model_store.config import ONNX_BACKENDS, ONNX_PLATFORMS
from model_store.spec import ModelId, ModelSpec
from runtimes.base import Runtime
from runtimes.errors import ModelLoadError
from runtimes.onnx_runtime import OnnxOptions, OnnxRuntime


class RuntimeFactory:
    """Builds runtimes with the settings that apply to every model."""

    def __init__(self, onnx: OnnxOptions) -> None:
        self._onnx = onnx

    def __call__(self, model: ModelId, spec: ModelSpec, path: Path) -> Runtime:
        if spec.platform in ONNX_PLATFORMS or spec.backend in ONNX_BACKENDS:
            return OnnxRuntime(model, spec, path, self._onnx)
        kind = spec.platform or spec.backend
        raise ModelLoadError(
            f"unknown platform/backend '{kind}' (modelgate serves onnxruntime_onnx)"
        )
