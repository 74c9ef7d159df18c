"""Converts between the wire (ModelInferRequest / ModelInferResponse) and plain tensors,
with no model's spec on the way in. Every size a client claims is checked against the bytes
it sent before anything is allocated, so this is where hostile input stops."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.pipeline.classification import class_count
from gateway.pipeline.tensors import (
    MAX_ELEMENTS,
    MAX_TENSORS,
    DecodedRequest,
    InputLayout,
    OutputOptions,
    RequestLayout,
    check_name,
    check_shape,
    check_size,
    datatype_of,
    element_bytes,
    from_raw,
    to_raw,
)
from model_store.datatypes import CONTENTS_FIELDS, DataType
from model_store.spec import ModelSpec
from modelgate_pb import grpc_service_pb2 as pb
from runtimes.base import InferRequest, Tensor

# Re-exported: the hot-path codec and the hardening tests take them from here.
__all__ = [
    "MAX_ELEMENTS", "MAX_TENSORS", "decode_request", "encode_response", "output_options",
    "request_parameters", "to_raw", "wants_typed",
]


def decode_request(request: pb.ModelInferRequest) -> DecodedRequest:
    """Turn a request into plain tensors in its own datatypes and shapes, checking every
    claimed size against the bytes present first; the spec check is the pipeline's. What
    is wrong with the message's structure raises here; what is wrong with its tensors' data
    travels as ``invalid`` (see DecodedRequest)."""
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
    declared: dict[str, InputLayout] = {}
    for tensor in inputs:
        check_name("input", tensor.name)
        if tensor.name in declared:
            raise InvalidRequestError(f"input '{tensor.name}' appears more than once")
        declared[tensor.name] = (
            tensor.name, datatype_of(tensor.name, tensor.datatype),
            check_shape(tensor.name, tensor.shape),
        )
    requested: set[str] = set()
    for output in request.outputs:
        check_name("output", output.name)
        if output.name in requested:
            raise InvalidRequestError(f"output '{output.name}' is requested more than once")
        requested.add(output.name)
    names = tuple(o.name for o in request.outputs)
    layout = RequestLayout(tuple(declared.values()), names)
    options = output_options(request.outputs)
    try:
        # Sizes are checked here but answered after the model's signature check (the
        # pipeline's), which names the dimension it wants: integer arithmetic only so far.
        for name, _, shape in layout.inputs:
            check_size(name, shape)
        arrays: dict[str, Tensor] = {}
        for index, (name, datatype, shape) in enumerate(layout.inputs):
            if raw:
                arrays[name] = from_raw(name, datatype, shape, raw[index])
            else:
                arrays[name] = _from_contents(inputs[index], datatype, shape)
        priority, timeout_us = request_parameters(request.parameters)
    except InvalidRequestError as exc:
        return DecodedRequest(InferRequest(inputs={}, outputs=names), layout, exc, options)
    return DecodedRequest(
        InferRequest(inputs=arrays, outputs=names, priority=priority, timeout_us=timeout_us),
        layout, None, options,
    )


def output_options(
    requested: Sequence[pb.ModelInferRequest.InferRequestedOutputTensor],
) -> OutputOptions | None:
    """What the requested outputs ask beyond their names: a class count in the parameter
    ``classification`` (the classification extension). None when nothing is asked."""
    classes: dict[str, int] = {}
    for output in requested:
        params = output.parameters
        if params and "classification" in params:
            param = params["classification"]
            which = param.WhichOneof("parameter_choice")
            value = (param.int64_param if which == "int64_param"
                     else param.uint64_param if which == "uint64_param" else None)
            classes[output.name] = class_count(output.name, value)
    return OutputOptions(classes) if classes else None


def request_parameters(params: Mapping[str, pb.InferParameter]) -> tuple[int, int | None]:
    """The scheduling parameters a request sets: priority (0: none) and timeout (µs)."""
    if not params:
        return 0, None
    return _int_param(params, "priority", 0), _int_param(params, "timeout", None)


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
    datatypes: Mapping[str, DataType] | None = None,
) -> pb.ModelInferResponse:
    """Build the response; raw_output_contents unless an output asked for
    ``binary_data: false``, in which case that output comes as typed contents.
    ``datatypes``: each output's answered datatype, where it is not the spec's."""
    response = pb.ModelInferResponse(
        model_name=spec.name, model_version=str(version), id=request.id
    )
    # raw_output_contents is indexed like outputs, so raw and typed cannot be mixed: a client
    # that asks for typed data (binary_data: false) on any output gets every output typed.
    typed = wants_typed(request.outputs)
    declared = datatypes or {t.name: t.datatype for t in spec.outputs}
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
        values: list[Any] = [element_bytes(e) for e in flat]
    else:
        values = flat.tolist()
    getattr(out.contents, field).extend(values)
