"""Converts between the wire (ModelInferRequest / ModelInferResponse) and plain tensors,
with no model's spec on the way in. Every size a client claims is checked against the bytes
it sent before anything is allocated, so this is where hostile input stops."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from gateway.errors import InvalidRequestError, NotSupportedError
from gateway.pipeline.classification import class_count
from gateway.pipeline.shared_memory import (
    BYTE_SIZE,
    OFFSET,
    REGION,
    TenantMemory,
    memory_ref,
)
from gateway.pipeline.tensors import (
    MAX_ELEMENTS,
    MAX_TENSORS,
    check_name,
    check_shape,
    check_size,
    datatype_of,
    element_bytes,
    from_raw,
    to_raw,
)
from gateway.request.decoded import (
    DecodedRequest,
    InputLayout,
    MemoryRef,
    OutputOptions,
    RequestLayout,
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


def decode_request(
    request: pb.ModelInferRequest, memory: TenantMemory | None = None
) -> DecodedRequest:
    """Turn a request into plain tensors in its own datatypes and shapes, checking every
    claimed size against the bytes present first; the spec check is the pipeline's. What
    is wrong with the message's structure raises here; what is wrong with its tensors' data
    travels as ``invalid`` (see DecodedRequest). ``memory``: the caller's shared memory,
    which inputs naming a region are read from (and outputs checked against)."""
    inputs = request.inputs
    raw = request.raw_input_contents
    if len(inputs) > MAX_TENSORS or len(request.outputs) > MAX_TENSORS:
        raise InvalidRequestError(f"a request may carry at most {MAX_TENSORS} inputs and outputs")
    refs = {t.name: _memory_ref("input", t.name, t.parameters)
            for t in inputs if t.parameters and REGION in t.parameters}
    if refs:
        if memory is None:
            raise NotSupportedError("shared memory inputs are not served on this method")
        memory.check_reads(refs.values())
    if raw and len(raw) != len(inputs) - len(refs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(inputs) - len(refs)} inputs not in shared memory; with raw contents every "
            "such input must have one"
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
    options = output_options(request.outputs, memory)
    try:
        # Sizes are checked here but answered after the model's signature check (the
        # pipeline's), which names the dimension it wants: integer arithmetic only so far.
        for name, _, shape in layout.inputs:
            check_size(name, shape)
        arrays: dict[str, Tensor] = {}
        raw_index = 0  # raw contents are listed for the inputs not in shared memory only
        for index, (name, datatype, shape) in enumerate(layout.inputs):
            ref = refs.get(name)
            if ref is not None and memory is not None:
                arrays[name] = from_raw(name, datatype, shape, memory.read(ref))
            elif raw:
                arrays[name] = from_raw(name, datatype, shape, raw[raw_index])
                raw_index += 1
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
    memory: TenantMemory | None = None,
) -> OutputOptions | None:
    """What the requested outputs ask beyond their names: a class count in the parameter
    ``classification`` (the classification extension), a place in the caller's shared
    memory (``shared_memory_region`` ..., checked against the region here, before the
    model runs). None when nothing is asked."""
    classes: dict[str, int] = {}
    regions: dict[str, MemoryRef] = {}
    for output in requested:
        params = output.parameters
        if not params:
            continue
        if "classification" in params:
            classes[output.name] = class_count(
                output.name, _value(params["classification"], numbers_only=True))
        if REGION in params:
            if memory is None:
                raise NotSupportedError("shared memory outputs are not served on this method")
            ref = _memory_ref("output", output.name, params)
            memory.check(ref)
            regions[output.name] = ref
    return OutputOptions(classes, regions) if classes or regions else None


def _value(param: pb.InferParameter, numbers_only: bool = False) -> object:
    """A parameter's value (None when unset; a number only, if ``numbers_only``)."""
    which = param.WhichOneof("parameter_choice")
    if which is None or (numbers_only and which not in ("int64_param", "uint64_param")):
        return None
    return getattr(param, which)


def _memory_ref(kind: str, name: str, params: Mapping[str, pb.InferParameter]) -> MemoryRef:
    def get(key: str) -> object:
        return _value(params[key]) if key in params else None

    return memory_ref(f"{kind} '{name}'", get(REGION), get(BYTE_SIZE), get(OFFSET))


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
    *, written: Mapping[str, MemoryRef] | None = None,
) -> pb.ModelInferResponse:
    """Build the response; raw_output_contents unless an output asked for
    ``binary_data: false``, in which case that output comes as typed contents.
    ``datatypes``: each output's answered datatype, where it is not the spec's;
    ``written``: the outputs already written to shared memory (described, no data)."""
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
        ref = written.get(name) if written else None
        if ref is not None:
            out.parameters[REGION].string_param = ref.region
            out.parameters[BYTE_SIZE].int64_param = ref.byte_size
            if ref.offset:
                out.parameters[OFFSET].int64_param = ref.offset
        elif typed:
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
