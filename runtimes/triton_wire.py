"""Tensors on Triton's wire for the Triton runtime: InferRequest tensors into raw_input_contents
(passing the client's bytes through untouched where they are still whole) and raw or typed
ModelInferResponse outputs back into arrays without copying."""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping
from typing import Final

import numpy as np

from model_store.datatypes import DataType
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import Tensor
from runtimes.errors import InferenceFailed

_LEN: Final = struct.Struct("<I")



def raw_bytes(datatype: DataType, array: Tensor) -> bytes:
    """The tensor as raw contents. An array that is a whole, row-major view of a ``bytes``
    object (what the gateway makes of a client's raw input) is sent as that very object."""
    if datatype is DataType.BYTES:
        parts: list[bytes] = []
        for element in array.reshape(-1):
            data = element if isinstance(element, bytes) else str(element).encode("utf-8")
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    if array.dtype == datatype.numpy_dtype and array.flags.c_contiguous:
        base = array.base
        while isinstance(base, np.ndarray):
            base = base.base
        if isinstance(base, bytes) and len(base) == array.nbytes:
            return base
    return np.ascontiguousarray(array, dtype=datatype.numpy_dtype).tobytes()


def build_request(
    model: str,
    *,
    version: str,
    inputs: Mapping[str, Tensor],
    datatypes: Mapping[str, DataType],
    outputs: tuple[str, ...],
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInferRequest carrying every input as raw contents."""
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for name, array in inputs.items():
        datatype = datatypes[name]
        request.inputs.add(name=name, datatype=datatype.value, shape=array.shape)
        request.raw_input_contents.append(raw_bytes(datatype, array))
    for name in outputs:
        request.outputs.add(name=name)
    return request


def decode_outputs(response: pb.ModelInferResponse) -> dict[str, Tensor]:
    """The response's outputs as arrays (raw data is viewed in place, read-only)."""
    raw = response.raw_output_contents
    if raw and len(raw) != len(response.outputs):
        raise InferenceFailed(
            f"upstream answered {len(response.outputs)} outputs with {len(raw)} raw contents"
        )
    arrays: dict[str, Tensor] = {}
    for index, tensor in enumerate(response.outputs):
        try:
            datatype = DataType.from_wire(tensor.datatype)
        except ValueError:
            raise InferenceFailed(
                f"upstream output '{tensor.name}' has unknown datatype {tensor.datatype!r}"
            ) from None
        shape = tuple(int(d) for d in tensor.shape)
        if raw:
            arrays[tensor.name] = _from_raw(tensor.name, datatype, shape, raw[index])
        else:
            arrays[tensor.name] = _from_contents(tensor, datatype, shape)
    return arrays


def _from_raw(name: str, datatype: DataType, shape: tuple[int, ...], data: bytes) -> Tensor:
    count = math.prod(shape)
    if datatype is not DataType.BYTES:
        if count * datatype.itemsize != len(data):
            raise InferenceFailed(
                f"upstream output '{name}': shape {list(shape)} of {datatype.value} needs "
                f"{count * datatype.itemsize} bytes, got {len(data)}"
            )
        return np.frombuffer(data, dtype=datatype.numpy_dtype).reshape(shape)
    elements: list[bytes] = []
    offset = 0
    view = memoryview(data)
    for _ in range(count):
        if offset + _LEN.size > len(data):
            raise InferenceFailed(f"upstream output '{name}': truncated BYTES element")
        (length,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise InferenceFailed(f"upstream output '{name}': BYTES contents do not match shape")
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _from_contents(
    tensor: pb.ModelInferResponse.InferOutputTensor, datatype: DataType, shape: tuple[int, ...]
) -> Tensor:
    field = datatype.contents_field
    if field is None:
        raise InferenceFailed(f"upstream output '{tensor.name}': {datatype.value} without raw data")
    values = getattr(tensor.contents, field)
    if len(values) != math.prod(shape):
        raise InferenceFailed(f"upstream output '{tensor.name}': contents do not match shape")
    if datatype is DataType.BYTES:
        array = np.empty(len(values), dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    return np.array(values, dtype=datatype.numpy_dtype).reshape(shape)
