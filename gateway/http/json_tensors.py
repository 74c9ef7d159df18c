"""V2 JSON tensor data: a ``data`` list (flat or nested, row-major) to an array of the
declared datatype and back. The list is already parsed, so its length bounds every
allocation; the claimed shape is only compared with it."""

from __future__ import annotations

import math
from typing import Any, Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.pipeline.tensors import element_bytes
from model_store.datatypes import DataType
from runtimes.base import Tensor

# numpy's inferred kinds that the float datatypes take (any JSON number); integers take JSON
# integers only, BOOL true/false only.
_NUMBER: Final = frozenset("iuf")
_FLOATS: Final = frozenset({DataType.FP16, DataType.FP32, DataType.FP64, DataType.BF16})


def flatten(name: str, data: Any, shape: tuple[int, ...]) -> list[Any]:
    """The elements of ``data`` in row-major order: a flat list, or lists nested exactly as
    ``shape`` (one level per dimension, each as long as its dimension); any other nesting
    is refused naming the first place it goes wrong."""
    if not isinstance(data, list):
        raise InvalidRequestError(f"input '{name}': 'data' must be a list")
    if list not in set(map(type, data)):
        return data
    out: list[Any] = []
    _extend(name, data, shape, 0, "", out=out)
    return out


def _extend(name: str, items: list[Any], shape: tuple[int, ...], level: int, path: str, *,
            out: list[Any]) -> None:
    if level >= len(shape) or len(items) != shape[level]:
        where = f"data{path}"
        if level >= len(shape):
            problem = f"{where} is a list nested deeper than the shape's {len(shape)} levels"
        else:
            problem = (f"{where} holds {len(items)} items where dimension {level} of the "
                       f"shape is {shape[level]}")
        raise InvalidRequestError(f"input '{name}': nested 'data' must follow the shape "
                                  f"{list(shape)}; {problem}")
    leaf = level == len(shape) - 1
    for index, item in enumerate(items):
        if isinstance(item, list) == leaf:
            what = "a list where a value" if leaf else f"{_json_kind(item)} where a list"
            raise InvalidRequestError(
                f"input '{name}': nested 'data' must follow the shape {list(shape)}; "
                f"data{path}[{index}] is {what} was expected"
            )
        if leaf:
            out.append(item)
        else:
            _extend(name, item, shape, level + 1, f"{path}[{index}]", out=out)


def from_json(name: str, datatype: DataType, shape: tuple[int, ...], data: Any, *,
              booleans: bool = True) -> Tensor:
    """An array of ``datatype`` and ``shape`` from the JSON ``data`` of one input.
    ``booleans`` False says the request holds no JSON true or false at all, so numeric data
    need not be searched for one."""
    count = math.prod(shape)
    if datatype in _FLOATS and isinstance(data, list):
        fast = _numbers(data, shape, booleans)
        if fast is not None:
            if datatype is DataType.BF16:
                return _to_bf16(fast.astype(np.float32)).reshape(shape)
            return fast.astype(datatype.numpy_dtype).reshape(shape)
    flat = flatten(name, data, shape)
    if len(flat) != count:
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} needs {count} elements, 'data' holds "
            f"{len(flat)}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        for index, element in enumerate(flat):
            if not isinstance(element, str):
                raise InvalidRequestError(
                    f"input '{name}': BYTES data must be strings; element {index} is "
                    f"{_json_kind(element)}"
                )
            try:
                array[index] = element.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate escape such as "\ud800"
                raise InvalidRequestError(
                    f"input '{name}': BYTES element {index} is not valid Unicode ({exc.reason})"
                ) from exc
        return array.reshape(shape)
    if not flat:
        return np.empty(shape, dtype=datatype.numpy_dtype)
    if datatype in _FLOATS:
        inferred = np.asarray(flat)
        if inferred.dtype.kind not in _NUMBER or bool in set(map(type, flat)):
            raise InvalidRequestError(
                f"input '{name}': {datatype.value} data must be {_wanted(datatype)}; "
                f"{_offender(flat, datatype)}"
            )
        if datatype is DataType.BF16:
            return _to_bf16(inferred.astype(np.float32)).reshape(shape)
        return inferred.astype(datatype.numpy_dtype).reshape(shape)
    # Exact types, element by element: numpy would parse strings and truncate fractions.
    wanted = bool if datatype is DataType.BOOL else int
    if not set(map(type, flat)) <= {wanted}:
        raise InvalidRequestError(
            f"input '{name}': {datatype.value} data must be {_wanted(datatype)}; "
            f"{_offender(flat, datatype)}"
        )
    try:
        # From the Python values: numpy refuses out-of-range ints here where a cast from
        # an inferred int64 array would wrap them silently.
        return np.array(flat, dtype=datatype.numpy_dtype).reshape(shape)
    except OverflowError:
        raise InvalidRequestError(
            f"input '{name}': a value in 'data' is out of range for {datatype.value}"
        ) from None


def _numbers(data: list[Any], shape: tuple[int, ...], booleans: bool
             ) -> np.ndarray[Any, Any] | None:
    """``data`` (flat, or nested as ``shape``) as numpy infers it, when that is numbers and
    no boolean (numpy would read true as 1.0); else None, and the element-wise path says
    what is wrong."""
    try:
        inferred = np.asarray(data)
    except (ValueError, TypeError, RecursionError):  # ragged nesting, too deep for numpy
        return None
    if (inferred.dtype.kind not in _NUMBER or inferred.size != math.prod(shape)
            or (inferred.ndim > 1 and inferred.shape != shape)
            or (booleans and _holds_bool(data))):
        return None
    return inferred


def _holds_bool(data: list[Any]) -> bool:
    """Whether evenly nested ``data`` holds a boolean (type checks run in C per row)."""
    if not data or type(data[0]) is not list:
        return bool in set(map(type, data))
    return any(_holds_bool(row) for row in data)


def to_json(name: str, datatype: DataType, array: Tensor) -> list[Any] | Tensor:
    """An output's elements, flat, as what orjson writes as a JSON list: a contiguous
    array of a numeric datatype, else a list (BYTES as UTF-8 strings, and floats that are
    not all finite, which the standard library writes as NaN and Infinity)."""
    flat = np.asarray(array).reshape(-1)
    if datatype is DataType.BYTES:
        out: list[Any] = []
        for element in flat:
            try:
                out.append(element_bytes(element).decode("utf-8"))
            except UnicodeDecodeError:
                raise InvalidRequestError(
                    f"output '{name}' holds bytes that are not UTF-8 text; ask for it with "
                    "binary_data: true"
                ) from None
        return out
    if datatype is DataType.BF16:
        values = _from_bf16(flat)
    else:
        values = np.ascontiguousarray(flat, dtype=datatype.numpy_dtype)
    if datatype in _FLOATS and not np.isfinite(values).all():
        return values.tolist()  # type: ignore[no-any-return]
    return values


def _to_bf16(values: np.ndarray[Any, Any]) -> Tensor:
    # bfloat16 is the upper half of a float32; round to nearest even on the dropped half.
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype("<u2")


def _from_bf16(bits: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return (bits.astype("<u4") << 16).view("<f4")


def _wanted(datatype: DataType) -> str:
    if datatype is DataType.BOOL:
        return "true or false"
    return "numbers" if datatype in _FLOATS else "integers"


def _offender(flat: list[Any], datatype: DataType) -> str:
    for index, element in enumerate(flat):
        ok = (isinstance(element, bool) if datatype is DataType.BOOL
              else isinstance(element, (int, float)) and not isinstance(element, bool)
              and (datatype in _FLOATS or isinstance(element, int)))
        if not ok:
            return f"element {index} is {_json_kind(element)}"
    return "a value is out of range"


def _json_kind(element: object) -> str:
    if isinstance(element, bool):
        return "a boolean"
    if isinstance(element, int):
        return "an integer"
    if isinstance(element, float):
        return "a number with a fraction"
    if isinstance(element, str):
        return "a string"
    if element is None:
        return "null"
    return "an object"
