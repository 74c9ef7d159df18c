"""Converts between the wire (ModelInferRequest / ModelInferResponse) and plain tensors.
Every size a client claims is checked against the bytes it sent before anything is
allocated, so this is where hostile input stops."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.sanitize import echoed
from model_store.datatypes import CONTENTS_FIELDS, DataType
from model_store.spec import ModelSpec
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import InferRequest, Tensor

MAX_RANK: Final = 16
MAX_TENSORS: Final = 128
# No message can carry more elements than it has bytes (the receive limit is below 2**31),
# so a larger claimed count is rejected before any arithmetic reaches numpy or a runtime.
MAX_ELEMENTS: Final = 2**31 - 1
MAX_NAME: Final = 256
_LEN: Final = struct.Struct("<I")
# C0/C1 controls, DEL and the Unicode line/paragraph separators: never in a tensor name.
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")



def decode_request(request: pb.ModelInferRequest, spec: ModelSpec) -> InferRequest:
    """Check a request against the model and turn it into plain tensors."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if len(inputs) > MAX_TENSORS or len(request.outputs) > MAX_TENSORS:
        raise InvalidRequestError(f"a request may carry at most {MAX_TENSORS} inputs and outputs")
    if raw and len(raw) != len(inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries but the request has {len(inputs)} inputs; "
            "with raw contents every input must have one"
        )
    if raw and any(t.HasField("contents") for t in inputs):
        raise InvalidRequestError(
            "the request uses both raw_input_contents and typed contents; use one or the other"
        )
    declared: dict[str, tuple[DataType, tuple[int, ...]]] = {}
    for tensor in inputs:
        _check_name("input", tensor.name)
        if tensor.name in declared:
            raise InvalidRequestError(f"input '{tensor.name}' appears more than once")
        declared[tensor.name] = (_datatype(tensor.name, tensor.datatype), _shape(tensor))
    requested: set[str] = set()
    for output in request.outputs:
        _check_name("output", output.name)
        if output.name in requested:
            raise InvalidRequestError(f"output '{output.name}' is requested more than once")
        requested.add(output.name)
    # The model's own signature speaks first (its message names the dimension it wants);
    # that check is integer arithmetic only, so a huge claimed shape costs nothing yet.
    rows = spec.check_inputs(declared)
    for name, (_, shape) in declared.items():
        _check_size(name, shape)
    arrays: dict[str, Tensor] = {}
    for index, tensor in enumerate(inputs):
        datatype, shape = declared[tensor.name]
        if raw:
            arrays[tensor.name] = _from_raw(tensor.name, datatype, shape, raw[index])
        else:
            arrays[tensor.name] = _from_contents(tensor, datatype, shape)
    names = tuple(o.name for o in request.outputs)
    spec.check_outputs(names)
    priority, timeout_us = request_parameters(request.parameters)
    return InferRequest(
        inputs=arrays, outputs=names, rows=rows, priority=priority, timeout_us=timeout_us
    )


def request_parameters(params: Mapping[str, pb.InferParameter]) -> tuple[int, int | None]:
    """The scheduling parameters a request sets: priority (0: none) and timeout (µs)."""
    if not params:
        return 0, None
    return _int_param(params, "priority", 0), _int_param(params, "timeout", None)


def _check_name(kind: str, name: str) -> None:
    # Names are echoed in error messages (and by them in client logs): only printable,
    # bounded ones get that far.
    if not name or len(name) > MAX_NAME or _UNPRINTABLE.search(name):
        raise InvalidRequestError(
            f"{kind} name '{echoed(name, 64)}' must be 1..{MAX_NAME} printable characters"
        )


def _datatype(name: str, wire: str) -> DataType:
    try:
        return DataType.from_wire(wire)
    except ValueError:
        raise InvalidRequestError(
            f"input '{name}': unknown datatype '{echoed(wire, 32)}'"
        ) from None


def _shape(tensor: pb.ModelInferRequest.InferInputTensor) -> tuple[int, ...]:
    shape = tuple(tensor.shape)
    if len(shape) > MAX_RANK:
        raise InvalidRequestError(f"input '{tensor.name}': rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidRequestError(
            f"input '{tensor.name}': shape {list(shape)} has a negative dimension"
        )
    return shape


def _check_size(name: str, shape: tuple[int, ...]) -> None:
    # Each dimension and the product are capped separately: [0, 2**62] holds no element
    # but would still overflow the int64 size arithmetic of numpy or a runtime.
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} exceeds {MAX_ELEMENTS} elements"
        )


def _from_raw(name: str, datatype: DataType, shape: tuple[int, ...], data: bytes) -> Tensor:
    count = math.prod(shape)
    if datatype is DataType.BYTES:
        return _bytes_from_raw(name, shape, count, data)
    expected = count * datatype.itemsize
    if expected != len(data):
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} of {datatype.value} needs {expected} bytes, "
            f"raw contents hold {len(data)}"
        )
    # Zero-copy view of the request's bytes; the array is read-only, which runtimes respect.
    return np.frombuffer(data, dtype=datatype.numpy_dtype).reshape(shape)


def _bytes_from_raw(name: str, shape: tuple[int, ...], count: int, data: bytes) -> Tensor:
    # Every element costs at least its 4-byte length prefix: reject impossible counts before
    # allocating the element array.
    if count * _LEN.size > len(data):
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} needs {count} BYTES elements but the raw "
            f"contents ({len(data)} bytes) cannot hold them"
        )
    elements: list[bytes] = []
    offset = 0
    view = memoryview(data)
    for index in range(count):
        if offset + _LEN.size > len(data):
            raise InvalidRequestError(
                f"input '{name}': BYTES element {index} has no 4-byte length prefix"
            )
        (length,) = _LEN.unpack_from(view, offset)
        offset += _LEN.size
        if offset + length > len(data):
            raise InvalidRequestError(
                f"input '{name}': BYTES element {index} claims {length} bytes but only "
                f"{len(data) - offset} remain"
            )
        elements.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(data):
        raise InvalidRequestError(
            f"input '{name}': {len(data) - offset} bytes left over after {count} BYTES elements"
        )
    array = np.empty(count, dtype=object)
    array[:] = elements
    return array.reshape(shape)


def _from_contents(
    tensor: pb.ModelInferRequest.InferInputTensor, datatype: DataType, shape: tuple[int, ...]
) -> Tensor:
    name = tensor.name
    count = math.prod(shape)
    field = datatype.contents_field
    if field is None:
        raise InvalidRequestError(
            f"input '{name}': {datatype.value} data must be sent as raw_input_contents"
        )
    contents = tensor.contents
    for other in set(CONTENTS_FIELDS) - {field}:
        if len(getattr(contents, other)):
            raise InvalidRequestError(
                f"input '{name}': {datatype.value} data belongs in contents.{field}, "
                f"not contents.{other}"
            )
    values = getattr(contents, field)
    if len(values) != count:
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} needs {count} elements, "
            f"contents.{field} holds {len(values)}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    try:
        return np.array(values, dtype=datatype.numpy_dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequestError(
            f"input '{name}': a value in contents.{field} is out of range for {datatype.value}"
        ) from None


def _int_param(params: Mapping[str, pb.InferParameter], key: str, default: Any) -> Any:
    if key not in params:
        return default
    param = params[key]
    which = param.WhichOneof("parameter_choice")
    if which == "int64_param":
        value = int(param.int64_param)
    elif which == "uint64_param":
        value = int(param.uint64_param)
    else:
        raise InvalidRequestError(f"request parameter '{key}' must be an integer")
    if value < 0:
        raise InvalidRequestError(f"request parameter '{key}' must not be negative")
    return value


def encode_response(
    request: pb.ModelInferRequest,
    spec: ModelSpec,
    version: int,
    outputs: Mapping[str, Tensor],
) -> pb.ModelInferResponse:
    """Build the response; raw_output_contents unless an output asked for
    ``binary_data: false``, in which case that output comes as typed contents."""
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=str(version), id=request.id
    )
    # raw_output_contents is indexed like outputs, so raw and typed cannot be mixed: a client
    # that asks for typed data (binary_data: false) on any output gets every output typed.
    typed = wants_typed(request.outputs)
    declared = {t.name: t.datatype for t in spec.outputs}
    for name, array in outputs.items():
        datatype = declared[name]
        out = response.outputs.add(name=name, datatype=datatype.value, shape=array.shape)
        if typed:
            _fill_contents(out, datatype, array)
        else:
            response.raw_output_contents.append(to_raw(datatype, array))
    return response


def wants_typed(requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor]) -> bool:
    """Whether any requested output asked for typed contents (``binary_data: false``)."""
    for output in requested:
        param = output.parameters.get("binary_data")
        if param is not None and param.WhichOneof("parameter_choice") == "bool_param" and (
            not param.bool_param
        ):
            return True
    return False


def to_raw(datatype: DataType, array: Tensor) -> bytes:
    """Serialize a tensor row-major with no padding (BYTES: 4-byte little-endian lengths)."""
    if datatype is DataType.BYTES:
        parts = []
        for element in array.reshape(-1):
            data = _element_bytes(element)
            parts.append(_LEN.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=datatype.numpy_dtype).tobytes()


def _fill_contents(
    out: pb.ModelInferResponse.InferOutputTensor, datatype: DataType, array: Tensor
) -> None:
    field = datatype.contents_field
    if field is None:
        raise InvalidRequestError(
            f"output '{out.name}' is {datatype.value}, which is only sent as raw contents"
        )
    flat = array.reshape(-1)
    if datatype is DataType.BYTES:
        values: list[Any] = [_element_bytes(e) for e in flat]
    else:
        values = flat.tolist()
    getattr(out.contents, field).extend(values)


def _element_bytes(element: object) -> bytes:
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, (bytearray, memoryview, np.bytes_)):
        return bytes(element)
    return str(element).encode("utf-8")
