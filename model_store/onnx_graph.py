"""Reads an ONNX file's declared inputs and outputs, to derive or complete a model config
the way Triton's ONNX backend does when config.pbtxt leaves them out."""

from __future__ import annotations

from pathlib import Path
from typing import Final

import onnx

from model_store.errors import ModelConfigError
from modelgate_pb import model_config_pb2 as mc

_ELEM_TO_CONFIG: Final = {
    onnx.TensorProto.BOOL: mc.TYPE_BOOL,
    onnx.TensorProto.UINT8: mc.TYPE_UINT8,
    onnx.TensorProto.UINT16: mc.TYPE_UINT16,
    onnx.TensorProto.UINT32: mc.TYPE_UINT32,
    onnx.TensorProto.UINT64: mc.TYPE_UINT64,
    onnx.TensorProto.INT8: mc.TYPE_INT8,
    onnx.TensorProto.INT16: mc.TYPE_INT16,
    onnx.TensorProto.INT32: mc.TYPE_INT32,
    onnx.TensorProto.INT64: mc.TYPE_INT64,
    onnx.TensorProto.FLOAT16: mc.TYPE_FP16,
    onnx.TensorProto.FLOAT: mc.TYPE_FP32,
    onnx.TensorProto.DOUBLE: mc.TYPE_FP64,
    onnx.TensorProto.BFLOAT16: mc.TYPE_BF16,
    onnx.TensorProto.STRING: mc.TYPE_STRING,
}


def _signature(path: Path) -> tuple[list[tuple[str, int, list[int]]], ...]:
    try:
        # Only the graph's declarations are needed: never pull in external weight files.
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # onnx raises DecodeError, OSError and others
        raise ModelConfigError(f"cannot read ONNX file {path.name}: {exc}") from exc
    initializers = {i.name for i in model.graph.initializer}

    def describe(values: list[onnx.ValueInfoProto]) -> list[tuple[str, int, list[int]]]:
        out: list[tuple[str, int, list[int]]] = []
        for v in values:
            if v.name in initializers:
                continue
            tensor = v.type.tensor_type
            elem = _ELEM_TO_CONFIG.get(tensor.elem_type)  # type: ignore[call-overload]
            if elem is None:
                raise ModelConfigError(
                    f"ONNX tensor '{v.name}' has an element type the gateway cannot serve"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
            out.append((v.name, int(elem), dims))
        return out

    return describe(list(model.graph.input)), describe(list(model.graph.output))


def complete_config(config: mc.ModelConfig, model_file: Path) -> None:
    """Fill in what config.pbtxt left out (platform, inputs, outputs) from the ONNX graph.
    With max_batch_size > 0 the graph's first dimension is the batch and is dropped."""
    if not config.platform and not config.backend:
        config.platform = "onnxruntime_onnx"
    if config.input and config.output:
        return
    inputs, outputs = _signature(model_file)
    for declared, derived in ((config.input, inputs), (config.output, outputs)):
        if declared:
            continue
        for name, dtype, dims in derived:
            if config.max_batch_size > 0:
                if not dims or dims[0] != -1:
                    raise ModelConfigError(
                        f"max_batch_size > 0 but ONNX tensor '{name}' has no variable first "
                        "dimension to batch on"
                    )
                declared.add(name=name, data_type=dtype, dims=dims[1:])
            else:
                declared.add(name=name, data_type=dtype, dims=dims)
