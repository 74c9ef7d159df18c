"""The runtime registry: a toy runtime registered in a test serves a model of its own
platform through the real manager and pipeline (the architecture map's recipe, done once),
an unknown platform names what is served, and a kind cannot claim another's platform."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.models.backends import RuntimeFactory, RuntimeRegistry, builtin_runtimes
from gateway.models.manager import ModelManager
from gateway.models.served import VersionState
from gateway.pipeline.pipeline import InferencePipeline
from gateway.request.context import RequestContext
from gateway.request.decoded import DecodedRequest, RequestLayout
from gateway.tenancy.tenants import ANONYMOUS
from model_store.datatypes import DataType
from model_store.platforms import PLATFORMS, Platform
from model_store.repository import ModelRepository
from model_store.spec import ModelId, ModelSpec
from runtimes.base import InferRequest, Runtime, RuntimeMetadata, Tensor
from runtimes.onnx_runtime import OnnxOptions

TOY = Platform("toy", backends=frozenset({"toy"}))
TOY_CONFIG = '''name: "scaled"
backend: "toy"
default_model_filename: "model.toy"
max_batch_size: 4
input { name: "x" data_type: TYPE_FP32 dims: [2] }
output { name: "y" data_type: TYPE_FP32 dims: [2] }
'''


class ScaleRuntime(Runtime):
    """Multiplies its input by the number its model file holds."""

    def __init__(self, model: ModelId, spec: ModelSpec, path: Path) -> None:
        self.model, self.spec, self._path = model, spec, path
        self.factor = 0.0

    async def load(self) -> None:
        self.factor = float(self._path.read_text(encoding="utf-8"))

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        return {"y": np.multiply(np.asarray(request.inputs["x"], np.float32), self.factor)}

    async def unload(self) -> None:
        self.factor = 0.0

    def metadata(self) -> RuntimeMetadata:
        return RuntimeMetadata(self.model, "toy", "cpu", 1)


def _store(tmp_path: Path, backend: str = "toy") -> ModelRepository:
    folder = tmp_path / "scaled" / "1"
    folder.mkdir(parents=True)
    (folder / "model.toy").write_text("3", encoding="utf-8")
    (tmp_path / "scaled" / "config.pbtxt").write_text(
        TOY_CONFIG.replace('"toy"', f'"{backend}"'), encoding="utf-8")
    return ModelRepository(tmp_path)


async def test_a_registered_runtime_serves_its_platform_through_the_pipeline(
    tmp_path: Path,
) -> None:
    runtimes = builtin_runtimes(OnnxOptions())
    runtimes.register(TOY, ScaleRuntime)
    manager = ModelManager(_store(tmp_path), RuntimeFactory(OnnxOptions(), runtimes=runtimes))
    await manager.start()
    try:
        x = np.array([[1.0, 2.0]], np.float32)
        decoded = DecodedRequest(
            InferRequest(inputs={"x": x}),
            RequestLayout((("x", DataType.FP32, (1, 2)),), ()),
        )
        inference = await InferencePipeline(manager).infer(
            RequestContext(ANONYMOUS), "scaled", "", decoded)
        np.testing.assert_array_equal(inference.outputs["y"], [[3.0, 6.0]])
        assert inference.version.runtime is not None
        assert inference.version.runtime.metadata().platform == "toy"
    finally:
        await manager.stop()
    # The global registry the store reads was not changed by the test's registration.
    assert PLATFORMS.find("", "toy") is None


async def test_an_unregistered_platform_is_unavailable_naming_what_is_served(
    tmp_path: Path,
) -> None:
    manager = ModelManager(_store(tmp_path, backend="tensorflow"),
                           RuntimeFactory(OnnxOptions()))
    await manager.start()
    try:
        version = manager.model("scaled").versions[1]
        assert version.state is VersionState.UNAVAILABLE
        assert "unknown platform/backend 'tensorflow'" in version.reason
        assert "onnxruntime_onnx" in version.reason and "triton" in version.reason
    finally:
        await manager.stop()


def test_a_kind_cannot_claim_a_platform_another_kind_serves() -> None:
    registry = RuntimeRegistry()
    with pytest.raises(ValueError, match="onnxruntime_onnx"):
        registry.register(Platform("other", frozenset({"onnxruntime_onnx"})), ScaleRuntime)
