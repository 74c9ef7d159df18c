"""Tiny real ONNX models and config.pbtxt files for tests, built with onnx.helper into a
Triton-style store laid out under a temporary folder."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# V2 datatype -> ONNX element type, for every type ONNX Runtime's Python binding round-trips.
ONNX_TYPES: Final = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
    "BYTES": TensorProto.STRING,
}


def _finish(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def identity_all_types(width: int = 3) -> onnx.ModelProto:
    """One Identity per datatype: input ``in_<TYPE>`` [N,width] -> output ``out_<TYPE>``."""
    nodes, inputs, outputs = [], [], []
    for name, elem in ONNX_TYPES.items():
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
        inputs.append(helper.make_tensor_value_info(f"in_{name}", elem, ["batch", width]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", elem, ["batch", width]))
    return _finish(helper.make_graph(nodes, "identity_all_types", inputs, outputs))


def add_constant(value: float, width: int = 4) -> onnx.ModelProto:
    """``y = x + value`` and ``doubled = 2x`` on FP32 [N,width]: the answer tells which
    version ran."""
    const = numpy_helper.from_array(np.full((width,), value, dtype=np.float32), "c")
    two = numpy_helper.from_array(np.full((width,), 2.0, dtype=np.float32), "two")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "c"], ["y"]), helper.make_node("Mul", ["x", "two"],
                                                                      ["doubled"])],
        "add_constant",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width]),
            helper.make_tensor_value_info("doubled", TensorProto.FLOAT, ["batch", width]),
        ],
        initializer=[const, two],
    )
    return _finish(graph)


def config_pbtxt(
    name: str,
    inputs: Sequence[tuple[str, str, Sequence[int]]],
    outputs: Sequence[tuple[str, str, Sequence[int]]],
    max_batch_size: int = 8,
    extra: str = "",
) -> str:
    """A config.pbtxt; tensors are (name, V2 datatype, dims without the batch dimension)."""

    def tensor(kind: str, name: str, dtype: str, dims: Sequence[int]) -> str:
        type_name = "TYPE_STRING" if dtype == "BYTES" else f"TYPE_{dtype}"
        return f'{kind} {{ name: "{name}" data_type: {type_name} dims: {list(dims)} }}\n'

    text = f'name: "{name}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: {max_batch_size}\n'
    text += "".join(tensor("input", *t) for t in inputs)
    text += "".join(tensor("output", *t) for t in outputs)
    return text + extra


def write_model(
    store: Path, name: str, version: int, model: onnx.ModelProto | bytes, config: str | None
) -> Path:
    """Write ``<store>/<name>/<version>/model.onnx`` and, if given, its config.pbtxt."""
    folder = store / name / str(version)
    folder.mkdir(parents=True, exist_ok=True)
    data = model if isinstance(model, bytes) else model.SerializeToString()
    (folder / "model.onnx").write_bytes(data)
    if config is not None:
        (store / name / "config.pbtxt").write_text(config, encoding="utf-8")
    return folder


def add_model_config(name: str, width: int = 4, max_batch_size: int = 8, extra: str = "") -> str:
    """The config.pbtxt matching add_constant()."""
    return config_pbtxt(
        name,
        [("x", "FP32", [width])],
        [("y", "FP32", [width]), ("doubled", "FP32", [width])],
        max_batch_size=max_batch_size,
        extra=extra,
    )


def all_types_config(name: str = "all_types", width: int = 3) -> str:
    """The config.pbtxt matching identity_all_types()."""
    return config_pbtxt(
        name,
        [(f"in_{t}", t, [width]) for t in ONNX_TYPES],
        [(f"out_{t}", t, [width]) for t in ONNX_TYPES],
        max_batch_size=8,
    )


def plain_and_batched_store(root: Path, batch: int = 4) -> Path:
    """'plain' (adds 1) runs each request alone; 'batched' (adds 2) waits up to 10 s for a
    full batch of ``batch`` rows, and warms up with one, so loading never waits that out."""
    write_model(root, "plain", 1, add_constant(1.0), add_model_config("plain"))
    batched = add_model_config(
        "batched", max_batch_size=batch,
        extra=(
            "dynamic_batching { max_queue_delay_microseconds: 10000000 }\n"
            f'model_warmup [{{ name: "full" batch_size: {batch} inputs {{ key: "x" value: '
            "{ data_type: TYPE_FP32 dims: [4] zero_data: true } } }]\n"
        ),
    )
    write_model(root, "batched", 1, add_constant(2.0), batched)
    return root
