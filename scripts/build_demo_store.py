"""Build the bundled Triton-style demo model repository (gateway/demo_store) reproducibly.
Usage: python scripts/build_demo_store.py [--out DIR]; only the model folders it owns are replaced.
"""

from __future__ import annotations

import argparse
import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_digits, load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "gateway" / "demo_store"

OPSET = 17
ML_OPSET = 3
IR_VERSION = 9  # opset 17 needs IR >= 8; 9 loads in ONNX Runtime 1.31 and older runtimes.
BATCH_DIM = "batch"
PRODUCER = "modelgate-build-demo-store"

MODEL_NAMES: tuple[str, ...] = ("iris", "digits", "digits_unbatched", "species", "cnn")


# --------------------------------------------------------------------------------------
# Triton config.pbtxt rendering
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model, as Triton sees it (dims without the batch dim)."""

    name: str
    data_type: str
    dims: tuple[int, ...]


@dataclass(frozen=True)
class ModelSpec:
    """What goes into one model's config.pbtxt."""

    name: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    num_versions: int = 1
    preferred_batch_sizes: tuple[int, ...] | None = None
    max_queue_delay_microseconds: int | None = None
    dynamic_batching: bool = False


def _render_tensors(field: str, tensors: Sequence[TensorSpec]) -> list[str]:
    lines = [f"{field} ["]
    for index, tensor in enumerate(tensors):
        dims = ", ".join(str(d) for d in tensor.dims)
        lines += [
            "  {",
            f'    name: "{tensor.name}"',
            f"    data_type: {tensor.data_type}",
            f"    dims: [ {dims} ]",
            "  }," if index < len(tensors) - 1 else "  }",
        ]
    lines.append("]")
    return lines


def render_config(spec: ModelSpec) -> str:
    """Render a Triton ModelConfig in protobuf text format."""
    lines = [
        f'name: "{spec.name}"',
        'platform: "onnxruntime_onnx"',
        f"max_batch_size: {spec.max_batch_size}",
        f"version_policy: {{ latest: {{ num_versions: {spec.num_versions} }} }}",
    ]
    lines += _render_tensors("input", spec.inputs)
    lines += _render_tensors("output", spec.outputs)
    if spec.dynamic_batching:
        lines.append("dynamic_batching {")
        if spec.preferred_batch_sizes:
            sizes = ", ".join(str(s) for s in spec.preferred_batch_sizes)
            lines.append(f"  preferred_batch_size: [ {sizes} ]")
        if spec.max_queue_delay_microseconds is not None:
            lines.append(f"  max_queue_delay_microseconds: {spec.max_queue_delay_microseconds}")
        lines.append("}")
    lines.append("instance_group [ { count: 1 kind: KIND_CPU } ]")
    return "\n".join(lines) + "\n"


IRIS_SPEC = ModelSpec(
    name="iris",
    max_batch_size=64,
    inputs=(TensorSpec("features", "TYPE_FP32", (4,)),),
    outputs=(
        TensorSpec("label", "TYPE_INT64", (1,)),
        TensorSpec("probabilities", "TYPE_FP32", (3,)),
    ),
    num_versions=2,
)
DIGITS_SPEC = ModelSpec(
    name="digits",
    max_batch_size=64,
    inputs=(TensorSpec("pixels", "TYPE_FP32", (64,)),),
    outputs=(
        TensorSpec("label", "TYPE_INT64", (1,)),
        TensorSpec("probabilities", "TYPE_FP32", (10,)),
    ),
    dynamic_batching=True,
    preferred_batch_sizes=(16, 32),
    max_queue_delay_microseconds=500,
)
DIGITS_UNBATCHED_SPEC = ModelSpec(
    name="digits_unbatched",
    max_batch_size=64,
    inputs=DIGITS_SPEC.inputs,
    outputs=DIGITS_SPEC.outputs,
)
SPECIES_SPEC = ModelSpec(
    name="species",
    max_batch_size=64,
    inputs=(TensorSpec("name", "TYPE_STRING", (1,)),),
    outputs=(TensorSpec("class_id", "TYPE_INT64", (1,)),),
)
CNN_SPEC = ModelSpec(
    name="cnn",
    max_batch_size=32,
    inputs=(TensorSpec("image", "TYPE_FP32", (3, 32, 32)),),
    outputs=(TensorSpec("logits", "TYPE_FP32", (10,)),),
    dynamic_batching=True,
    max_queue_delay_microseconds=1000,
)

SPECS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (IRIS_SPEC, DIGITS_SPEC, DIGITS_UNBATCHED_SPEC, SPECIES_SPEC, CNN_SPEC)
}


# --------------------------------------------------------------------------------------
# Training (deterministic: fixed seeds, bundled data only)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FittedEstimators:
    """The scikit-learn estimators behind the demo models (sklearn is untyped, hence Any)."""

    iris_v1: Any
    iris_v2: Any
    digits: Any


def iris_data() -> tuple[np.ndarray, np.ndarray]:
    """Iris features (float32, [150, 4]) and integer targets, from sklearn's bundled copy."""
    data = load_iris()
    return np.asarray(data.data, dtype=np.float32), np.asarray(data.target, dtype=np.int64)


def digits_data() -> tuple[np.ndarray, np.ndarray]:
    """Digits pixels scaled to [0, 1] (float32, [1797, 64]) and integer targets."""
    data = load_digits()
    pixels = np.asarray(data.data, dtype=np.float32) / np.float32(16.0)
    return pixels, np.asarray(data.target, dtype=np.int64)


def species_names() -> list[str]:
    """The iris species names, in target order (setosa, versicolor, virginica)."""
    return [str(name) for name in load_iris().target_names]


def fit_estimators() -> FittedEstimators:
    """Fit the three scikit-learn estimators; the same call always gives the same models."""
    iris_x, iris_y = iris_data()
    iris_v1 = LogisticRegression(max_iter=1000).fit(iris_x, iris_y)
    iris_v2 = RandomForestClassifier(n_estimators=10, max_depth=4, random_state=0).fit(
        iris_x, iris_y
    )
    digits_x, digits_y = digits_data()
    with warnings.catch_warnings():
        # 60 epochs is deliberately short (fast, reproducible build); accuracy is still > 0.9.
        warnings.simplefilter("ignore", ConvergenceWarning)
        digits = MLPClassifier(hidden_layer_sizes=(512, 512), max_iter=60, random_state=0).fit(
            digits_x, digits_y
        )
    return FittedEstimators(iris_v1=iris_v1, iris_v2=iris_v2, digits=digits)


# --------------------------------------------------------------------------------------
# ONNX graph helpers
# --------------------------------------------------------------------------------------


def _set_batch_dim(value: onnx.ValueInfoProto) -> None:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        raise ValueError(f"{value.name}: expected a shape with a leading batch dimension")
    dims[0].Clear()
    dims[0].dim_param = BATCH_DIM


def _finalize(model: onnx.ModelProto, graph_name: str) -> onnx.ModelProto:
    """Normalise metadata, give every input/output a named dynamic batch dim, and check."""
    model.graph.name = graph_name
    for value in [*model.graph.input, *model.graph.output]:
        _set_batch_dim(value)
    uses_ml = any(node.domain == "ai.onnx.ml" for node in model.graph.node)
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", OPSET))
    if uses_ml:
        model.opset_import.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model.ir_version = IR_VERSION
    model.producer_name = PRODUCER
    model.producer_version = "1"
    model.domain = "ai.modelgate.demo"
    model.model_version = 1
    model.doc_string = ""
    onnx.checker.check_model(model, full_check=True)
    return model


def _unsqueeze_label(model: onnx.ModelProto, label: str = "label") -> None:
    """Turn skl2onnx's rank-1 ``label`` output [N] into [N, 1] with an Unsqueeze node."""
    graph = model.graph
    raw = f"{label}_rank1"
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == label:
                node.output[i] = raw
        for i, name in enumerate(node.input):
            if name == label:
                node.input[i] = raw
    for value in graph.value_info:
        if value.name == label:
            value.name = raw
    axes = f"{label}_unsqueeze_axes"
    graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), axes))
    graph.node.append(helper.make_node("Unsqueeze", [raw, axes], [label], name=f"{label}_2d"))
    for output in graph.output:
        if output.name == label:
            elem_type = output.type.tensor_type.elem_type
            output.CopyFrom(helper.make_tensor_value_info(label, elem_type, [BATCH_DIM, 1]))


def sklearn_to_onnx(
    estimator: Any, input_name: str, n_features: int, graph_name: str
) -> onnx.ModelProto:
    """Convert a classifier to ONNX with outputs ``label`` [N,1] and ``probabilities`` [N,C]."""
    converted = convert_sklearn(
        estimator,
        name=graph_name,
        initial_types=[(input_name, FloatTensorType([None, n_features]))],
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={id(estimator): {"zipmap": False}},
    )
    if not isinstance(converted, onnx.ModelProto):
        raise TypeError(f"skl2onnx returned {type(converted)!r}")
    model = converted
    outputs = [output.name for output in model.graph.output]
    if outputs != ["label", "probabilities"]:
        raise ValueError(f"{graph_name}: unexpected skl2onnx outputs {outputs}")
    _unsqueeze_label(model)
    return _finalize(model, graph_name)


def species_model() -> onnx.ModelProto:
    """String input ``name`` [N,1] -> ``class_id`` [N,1] via ai.onnx.ml LabelEncoder."""
    node = helper.make_node(
        "LabelEncoder",
        ["name"],
        ["class_id"],
        name="species_label_encoder",
        domain="ai.onnx.ml",
        keys_strings=species_names(),
        values_int64s=[0, 1, 2],
        default_int64=-1,
    )
    graph = helper.make_graph(
        [node],
        "species",
        [helper.make_tensor_value_info("name", TensorProto.STRING, [BATCH_DIM, 1])],
        [helper.make_tensor_value_info("class_id", TensorProto.INT64, [BATCH_DIM, 1])],
    )
    model = helper.make_model(
        graph,
        opset_imports=[
            helper.make_opsetid("", OPSET),
            helper.make_opsetid("ai.onnx.ml", ML_OPSET),
        ],
    )
    return _finalize(model, "species")


def cnn_model() -> onnx.ModelProto:
    """A small Conv/Relu/MaxPool x2 -> Flatten -> Gemm image classifier.

    The weights are random (default_rng(0), normal * 0.05): this is a compute-bound benchmark
    model, not a trained one, so its logits carry no meaning.
    """
    rng = np.random.default_rng(0)

    def weight(name: str, shape: tuple[int, ...]) -> TensorProto:
        values = (rng.normal(size=shape) * 0.05).astype(np.float32)
        return numpy_helper.from_array(values, name)

    initializers = [
        weight("conv1_w", (16, 3, 3, 3)),
        weight("conv1_b", (16,)),
        weight("conv2_w", (32, 16, 3, 3)),
        weight("conv2_b", (32,)),
        weight("fc_w", (10, 32 * 8 * 8)),
        weight("fc_b", (10,)),
    ]
    conv: dict[str, Any] = {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1], "strides": [1, 1]}
    pool: dict[str, Any] = {"kernel_shape": [2, 2], "strides": [2, 2]}
    nodes = [
        helper.make_node("Conv", ["image", "conv1_w", "conv1_b"], ["c1"], name="conv1", **conv),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", **pool),
        helper.make_node("Conv", ["p1", "conv2_w", "conv2_b"], ["c2"], name="conv2", **conv),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", **pool),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten", axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [BATCH_DIM, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [BATCH_DIM, 10])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    return _finalize(model, "cnn")


# --------------------------------------------------------------------------------------
# Store layout
# --------------------------------------------------------------------------------------


def profile_json(payload: bytes, inputs: dict[str, np.ndarray], source: str) -> str:
    """A version's reference profile (gateway/monitoring: docs/monitoring.md) from its
    training inputs and the outputs the ONNX model gives for them when served on CPU with
    the gateway's default session options (as ``modelgate profile`` runs it): a session
    with other thread counts differs in the last bits of some outputs."""
    import onnxruntime as ort

    from gateway.monitoring.profile import dumps
    from gateway.monitoring.reference import build_profile
    from runtimes.onnx_runtime import CPU, OnnxOptions, session_options

    session = ort.InferenceSession(payload, session_options(OnnxOptions(device="cpu")),
                                   providers=[CPU])
    names = [output.name for output in session.get_outputs()]
    outputs = dict(zip(names, session.run(names, inputs), strict=True))
    return dumps(build_profile(inputs, outputs, source=source))


def _write_model(
    out: Path, spec: ModelSpec, versions: dict[int, bytes], profiles: dict[int, str]
) -> None:
    model_dir = out / spec.name
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(render_config(spec), encoding="utf-8")
    for version, payload in sorted(versions.items()):
        version_dir = model_dir / str(version)
        version_dir.mkdir()
        (version_dir / "model.onnx").write_bytes(payload)
        if version in profiles:
            (version_dir / "profile.json").write_text(profiles[version], encoding="utf-8")


def build(out: Path) -> list[Path]:
    """Build every demo model into ``out``; returns the files written, sorted.

    Only ``out/<model>`` folders named in MODEL_NAMES are deleted and recreated; anything else
    under ``out`` is left alone.
    """
    out.mkdir(parents=True, exist_ok=True)
    fitted = fit_estimators()
    iris_v1 = sklearn_to_onnx(fitted.iris_v1, "features", 4, "iris").SerializeToString()
    iris_v2 = sklearn_to_onnx(fitted.iris_v2, "features", 4, "iris").SerializeToString()
    digits = sklearn_to_onnx(fitted.digits, "pixels", 64, "digits").SerializeToString()
    payloads: dict[str, dict[int, bytes]] = {
        "iris": {1: iris_v1, 2: iris_v2},
        "digits": {1: digits},
        "digits_unbatched": {1: digits},  # the same ONNX file as digits, unbatched config
        "species": {1: species_model().SerializeToString()},
        "cnn": {1: cnn_model().SerializeToString()},
    }
    # Drift references from the training data, so a served demo shows drift at once.
    iris_inputs = {"features": iris_data()[0]}
    digits_inputs = {"pixels": digits_data()[0]}
    iris_source = "training data: scikit-learn load_iris (150 rows)"
    profiles: dict[str, dict[int, str]] = {
        "iris": {1: profile_json(iris_v1, iris_inputs, iris_source),
                 2: profile_json(iris_v2, iris_inputs, iris_source)},
        "digits": {1: profile_json(digits, digits_inputs,
                                   "training data: scikit-learn load_digits / 16 (1797 rows)")},
    }
    written: list[Path] = []
    for name in MODEL_NAMES:
        _write_model(out, SPECS[name], payloads[name], profiles.get(name, {}))
        written += sorted(p for p in (out / name).rglob("*") if p.is_file())
    return sorted(written)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help=f"output model repository (default: {DEFAULT_OUT.relative_to(REPO_ROOT)})",
    )
    args = parser.parse_args(argv)
    out: Path = args.out
    for path in build(out):
        print(f"{path.stat().st_size:>10}  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
