"""The V2 REST infer body: its JSON header (inputs, outputs, parameters) with tensors as
JSON ``data`` or, with Triton's binary tensor extension, as raw bytes after the header
(Inference-Header-Content-Length); decoded without a model's spec, answered with the spec of
the version that ran."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import orjson

from gateway.errors import InvalidRequestError, NotSupportedError
from gateway.http.json_tensors import from_json, to_json
from gateway.pipeline.classification import class_count
from gateway.pipeline.shared_memory import (
    BYTE_SIZE,
    OFFSET,
    REGION,
    TenantMemory,
    memory_ref,
)
from gateway.pipeline.tensors import (
    MAX_TENSORS,
    check_name,
    check_shape,
    check_size,
    datatype_of,
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
from gateway.sanitize import echoed
from model_store.datatypes import DataType
from model_store.spec import ModelSpec
from runtimes.base import InferRequest, Tensor

HEADER_LENGTH: Final = "inference-header-content-length"
JSON_TYPE: Final = "application/json"
BINARY_TYPE: Final = "application/octet-stream"
_NUMPY: Final = orjson.OPT_SERIALIZE_NUMPY

# Each binary input's datatype, shape, and (start, end) in the bytes after the JSON header.
BinaryLayout = dict[str, tuple[DataType, tuple[int, ...], int, int]]


@dataclass(frozen=True, slots=True)
class InferBody:
    """What the response needs to know of the request: its id, and for each requested
    output whether it goes back as binary data (absent: the request-wide default)."""

    request_id: str | None
    binary_outputs: Mapping[str, bool]
    binary_default: bool


def header_end(body: bytes, header_length: str | None) -> int:
    """Where the JSON header ends and the binary data after it starts."""
    if header_length is None:
        end = len(body)
    else:
        text = header_length.strip()
        if not text.isdigit() or len(text) > 12:
            raise InvalidRequestError(
                "Inference-Header-Content-Length must be a non-negative integer"
            )
        end = int(text)
        if end > len(body):
            raise InvalidRequestError(
                f"Inference-Header-Content-Length is {end} but the body holds {len(body)} bytes"
            )
    return end


def parse_header(text: bytes | memoryview, exact: bool = False) -> Mapping[str, Any]:
    """The JSON header as an object. orjson parses it unless ``exact``; what orjson refuses
    (NaN and Infinity, which Python clients send for such floats) or bends (an integer past
    64 bits becomes a float) the standard library parses as it always has."""
    if not exact:
        try:
            header = orjson.loads(text)
        except orjson.JSONDecodeError:
            pass
        else:
            if not isinstance(header, dict):
                raise InvalidRequestError("the request body must be a JSON object")
            return header
    try:
        header = json.loads(bytes(text))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {_reason(exc)}") from None
    if not isinstance(header, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    return header


def _may_hold_booleans(body: bytes, header_end: int) -> bool:
    """Whether the JSON header holds the token true or false anywhere (a scan of its bytes,
    far cheaper than a type check of every element of every data list)."""
    return body.find(b"true", 0, header_end) >= 0 or body.find(b"false", 0, header_end) >= 0


def decode_infer(
    header: Mapping[str, Any], body: bytes, binary_start: int,
    memory: TenantMemory | None = None,
) -> tuple[DecodedRequest, InferBody, BinaryLayout | None]:
    """Turn an infer request into plain tensors in its own datatypes and shapes (the spec
    check is the pipeline's). Every binary_data_size is checked against the bytes present
    before any tensor is built. What is wrong with the header's structure raises here; what
    is wrong with its tensors' data travels as ``invalid`` (see DecodedRequest). The layout
    is None when an input came as JSON data or from shared memory (``memory``, the
    caller's, which inputs and outputs naming a region use)."""
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise InvalidRequestError("'inputs' must be a non-empty list")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise InvalidRequestError("'outputs' must be a list")
    if len(inputs) > MAX_TENSORS or len(outputs) > MAX_TENSORS:
        raise InvalidRequestError(f"a request may carry at most {MAX_TENSORS} inputs and outputs")
    request_id = header.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise InvalidRequestError("'id' must be a string")
    parameters = _object(header.get("parameters"), "'parameters'")
    declared: dict[str, InputLayout] = {}
    # An input's JSON data, its (start, end) in the body, or its place in shared memory.
    sources: dict[str, Any] = {}
    offset = binary_start
    for entry in inputs:
        name, datatype, shape, source, offset = _input(entry, body, offset)
        if name in declared:
            raise InvalidRequestError(f"input '{name}' appears more than once")
        declared[name] = (name, datatype, shape)
        sources[name] = source
    if offset != len(body):
        raise InvalidRequestError(
            f"{len(body) - offset} bytes of binary data follow the inputs that claim theirs"
        )
    binary_outputs = _requested_outputs(outputs, _binary_default(parameters))
    answer = InferBody(request_id, binary_outputs, _binary_default(parameters))
    names = tuple(binary_outputs)
    options = _output_options(outputs, memory)
    requested = RequestLayout(tuple(declared.values()), names)
    try:
        arrays, layout = _tensors(requested, sources, body, binary_start, memory)
        priority = _int_parameter(parameters, "priority") or 0
        timeout_us = _int_parameter(parameters, "timeout")
    except InvalidRequestError as exc:
        return (DecodedRequest(InferRequest(inputs={}, outputs=names), requested, exc, options),
                answer, None)
    request = InferRequest(inputs=arrays, outputs=names, priority=priority, timeout_us=timeout_us)
    return DecodedRequest(request, requested, None, options), answer, layout


def _tensors(
    requested: RequestLayout, sources: Mapping[str, Any], body: bytes, binary_start: int,
    memory: TenantMemory | None,
) -> tuple[dict[str, Tensor], BinaryLayout | None]:
    """Each input's array from its source (JSON data, binary data, shared memory), and the
    binary layout when every input came as binary data."""
    refs = [source for source in sources.values() if isinstance(source, MemoryRef)]
    if refs:
        if memory is None:
            raise NotSupportedError("shared memory inputs are not served here")
        memory.check_reads(refs)
    arrays: dict[str, Tensor] = {}
    layout: BinaryLayout | None = {}
    view = memoryview(body)
    # Answered after the model's signature check (the pipeline's), which names the
    # dimension it wants: that check is integer arithmetic only, as is this one.
    for name, datatype, shape in requested.inputs:
        check_size(name, shape)
        source = sources[name]
        if isinstance(source, MemoryRef) and memory is not None:
            arrays[name] = from_raw(name, datatype, shape, memory.read(source))
            layout = None
        elif isinstance(source, tuple):
            start, end = source
            arrays[name] = from_raw(name, datatype, shape, view[start:end])
            if layout is not None:
                layout[name] = (datatype, shape, start - binary_start, end - binary_start)
        else:
            arrays[name] = from_json(name, datatype, shape, source,
                                     booleans=_may_hold_booleans(body, binary_start))
            layout = None
    return arrays, layout


def _input(
    entry: object, body: bytes, offset: int
) -> tuple[str, DataType, tuple[int, ...], Any, int]:
    """One input's name, datatype, shape, data source, and the binary offset after it."""
    item = _object(entry, "each input")
    name = item.get("name")
    if not isinstance(name, str):
        raise InvalidRequestError("each input needs a 'name' string")
    check_name("input", name)
    wire = item.get("datatype")
    if not isinstance(wire, str):
        raise InvalidRequestError(f"input '{name}' needs a 'datatype' string")
    shape = item.get("shape")
    if not isinstance(shape, list) or not all(_is_int(d) for d in shape):
        raise InvalidRequestError(f"input '{name}': 'shape' must be a list of integers")
    datatype, checked = datatype_of(name, wire), check_shape(name, shape)
    parameters = _object(item.get("parameters"), f"input '{name}' parameters")
    size = parameters.get("binary_data_size")
    if REGION in parameters:
        if "data" in item or size is not None:
            raise InvalidRequestError(
                f"input '{name}' names a shared memory region and also carries data; send one")
        ref = memory_ref(f"input '{name}'", parameters[REGION], parameters.get(BYTE_SIZE),
                         parameters.get(OFFSET))
        return name, datatype, checked, ref, offset
    if size is None:
        if "data" not in item:
            raise InvalidRequestError(f"input '{name}' has neither 'data' nor binary data")
        return name, datatype, checked, item["data"], offset
    if not _is_int(size) or size < 0:
        raise InvalidRequestError(
            f"input '{name}': binary_data_size must be a non-negative integer"
        )
    if "data" in item:
        raise InvalidRequestError(f"input '{name}' has both 'data' and binary_data_size; send one")
    if offset + size > len(body):
        raise InvalidRequestError(
            f"input '{name}': binary_data_size {size} runs past the end of the body "
            f"({len(body) - offset} bytes remain)"
        )
    return name, datatype, checked, (offset, offset + size), offset + size


def _requested_outputs(outputs: list[Any], default: bool) -> dict[str, bool]:
    """Requested output names, each with whether it goes back as binary data."""
    binary: dict[str, bool] = {}
    for entry in outputs:
        item = _object(entry, "each requested output")
        name = item.get("name")
        if not isinstance(name, str):
            raise InvalidRequestError("each requested output needs a 'name' string")
        check_name("output", name)
        if name in binary:
            raise InvalidRequestError(f"output '{name}' is requested more than once")
        wanted = _object(item.get("parameters"), f"output '{name}' parameters").get(
            "binary_data"
        )
        if wanted is not None and not isinstance(wanted, bool):
            raise InvalidRequestError(f"output '{name}': binary_data must be true or false")
        binary[name] = default if wanted is None else wanted
    return binary


def _output_options(outputs: list[Any], memory: TenantMemory | None) -> OutputOptions | None:
    """A class count asked with an output's ``classification`` parameter (the
    classification extension), a place in the caller's shared memory (checked against the
    region before the model runs); None when no output asks either. Entries are objects
    here (_requested_outputs checked them)."""
    classes: dict[str, int] = {}
    regions: dict[str, MemoryRef] = {}
    for item in outputs:
        parameters = item.get("parameters") or {}
        name = item["name"]
        if "classification" in parameters:
            classes[name] = class_count(name, parameters["classification"])
        if REGION in parameters:
            if memory is None:
                raise NotSupportedError("shared memory outputs are not served here")
            ref = memory_ref(f"output '{name}'", parameters[REGION],
                             parameters.get(BYTE_SIZE), parameters.get(OFFSET))
            memory.check(ref)
            regions[name] = ref
    return OutputOptions(classes, regions) if classes or regions else None


def encode_infer(
    spec: ModelSpec, version: int, outputs: Mapping[str, Tensor], body: InferBody,
    datatypes: Mapping[str, DataType] | None = None,
    *, written: Mapping[str, MemoryRef] | None = None,
) -> tuple[bytes, int | None]:
    """The response body and, when it carries binary outputs, its JSON header's length.
    ``datatypes``: each output's answered datatype, where it is not the spec's;
    ``written``: the outputs already written to shared memory (described, no data)."""
    declared = datatypes or {t.name: t.datatype for t in spec.outputs}
    described: list[dict[str, Any]] = []
    raw: list[bytes] = []
    plain = False  # a float output that is not all finite: written as NaN/Infinity
    for name, array in outputs.items():
        datatype = declared[name]
        entry: dict[str, Any] = {"name": name, "datatype": datatype.value,
                                 "shape": list(array.shape)}
        ref = written.get(name) if written else None
        if ref is not None:
            entry["parameters"] = {REGION: ref.region, BYTE_SIZE: ref.byte_size,
                                   **({OFFSET: ref.offset} if ref.offset else {})}
        elif body.binary_outputs.get(name, body.binary_default):
            data = to_raw(datatype, array)
            entry["parameters"] = {"binary_data_size": len(data)}
            raw.append(data)
        else:
            entry["data"] = values = to_json(name, datatype, array)
            plain = plain or (isinstance(values, list) and datatype is not DataType.BYTES)
        described.append(entry)
    response: dict[str, Any] = {"model_name": spec.name, "model_version": str(version)}
    if body.request_id:
        response["id"] = body.request_id
    response["outputs"] = described
    try:
        if plain:  # orjson writes null for NaN and infinities; Python clients read these
            raise TypeError("non-finite floats")
        head = orjson.dumps(response, option=_NUMPY)
    except TypeError:  # that, or a dtype orjson does not write: lists, the standard way
        for entry in described:
            if "data" in entry:
                entry["data"] = np.asarray(entry["data"]).tolist()
        head = json.dumps(response, separators=(",", ":")).encode()
    if not raw:
        return head, None
    return b"".join((head, *raw)), len(head)


def _binary_default(parameters: Mapping[str, Any]) -> bool:
    value = parameters.get("binary_data_output", False)
    if not isinstance(value, bool):
        raise InvalidRequestError("binary_data_output must be true or false")
    return value


def _int_parameter(parameters: Mapping[str, Any], key: str) -> int | None:
    value = parameters.get(key)
    if value is None:
        return None
    if not _is_int(value) or value < 0:
        raise InvalidRequestError(f"request parameter '{key}' must be a non-negative integer")
    return int(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(value: object, what: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{what} must be a JSON object")
    return value


def _reason(exc: Exception) -> str:
    if isinstance(exc, RecursionError):
        return "nested too deeply"
    return echoed(str(exc), 120)
