"""The transport-free tensor checks every adapter shares: names, datatypes, shapes and sizes
checked before anything is allocated, raw (row-major, no padding) bytes to arrays and back."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.sanitize import echoed
from model_store.datatypes import DataType
from runtimes.base import Tensor

MAX_RANK: Final = 16
MAX_TENSORS: Final = 128
# No message can carry more elements than it has bytes (the receive limit is below 2**31),
# so a larger claimed count is rejected before any arithmetic reaches numpy or a runtime.
MAX_ELEMENTS: Final = 2**31 - 1
MAX_NAME: Final = 256
LENGTH_PREFIX: Final = struct.Struct("<I")
# C0/C1 controls, DEL and the Unicode line/paragraph separators: never in a tensor name.
_UNPRINTABLE: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def check_name(kind: str, name: str) -> None:
    """Names are echoed in error messages (and by them in client logs): only printable,
    bounded ones get that far."""
    if not name or len(name) > MAX_NAME or _UNPRINTABLE.search(name):
        raise InvalidRequestError(
            f"{kind} name '{echoed(name, 64)}' must be 1..{MAX_NAME} printable characters"
        )


def datatype_of(name: str, wire: str) -> DataType:
    """The V2 datatype an input names (InvalidRequestError for an unknown one)."""
    try:
        return DataType.from_wire(wire)
    except ValueError:
        raise InvalidRequestError(
            f"input '{name}': unknown datatype '{echoed(wire, 32)}'"
        ) from None


def check_shape(name: str, shape: Sequence[int]) -> tuple[int, ...]:
    """A claimed shape's rank and signs (its size is check_size's, after the model's own
    signature check has had its say)."""
    if len(shape) > MAX_RANK:
        raise InvalidRequestError(f"input '{name}': rank {len(shape)} exceeds {MAX_RANK}")
    if any(d < 0 for d in shape):
        raise InvalidRequestError(f"input '{name}': shape {list(shape)} has a negative dimension")
    return tuple(shape)


def check_size(name: str, shape: tuple[int, ...]) -> None:
    """Each dimension and the product are capped separately: [0, 2**62] holds no element
    but would still overflow the int64 size arithmetic of numpy or a runtime."""
    if any(d > MAX_ELEMENTS for d in shape) or math.prod(shape) > MAX_ELEMENTS:
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} exceeds {MAX_ELEMENTS} elements"
        )


def from_raw(
    name: str, datatype: DataType, shape: tuple[int, ...], data: bytes | memoryview
) -> Tensor:
    """A tensor from its raw bytes, whose length must be exactly what the shape needs."""
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


def _bytes_from_raw(
    name: str, shape: tuple[int, ...], count: int, data: bytes | memoryview
) -> Tensor:
    # Every element costs at least its 4-byte length prefix: reject impossible counts before
    # allocating the element array.
    size = LENGTH_PREFIX.size
    if count * size > len(data):
        raise InvalidRequestError(
            f"input '{name}': shape {list(shape)} needs {count} BYTES elements but the raw "
            f"contents ({len(data)} bytes) cannot hold them"
        )
    elements: list[bytes] = []
    offset = 0
    view = memoryview(data)
    for index in range(count):
        if offset + size > len(data):
            raise InvalidRequestError(
                f"input '{name}': BYTES element {index} has no 4-byte length prefix"
            )
        (length,) = LENGTH_PREFIX.unpack_from(view, offset)
        offset += size
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


def to_raw(datatype: DataType, array: Tensor) -> bytes:
    """Serialize a tensor row-major with no padding (BYTES: 4-byte little-endian lengths)."""
    if datatype is DataType.BYTES:
        parts = []
        for element in array.reshape(-1):
            data = element_bytes(element)
            parts.append(LENGTH_PREFIX.pack(len(data)))
            parts.append(data)
        return b"".join(parts)
    return np.ascontiguousarray(array, dtype=datatype.numpy_dtype).tobytes()


def element_bytes(element: object) -> bytes:
    """One BYTES element as bytes (runtimes may hand back str or numpy scalars)."""
    if isinstance(element, bytes):
        return element
    if isinstance(element, str):
        return element.encode("utf-8")
    if isinstance(element, (bytearray, memoryview, np.bytes_)):
        return bytes(element)
    return str(element).encode("utf-8")
