"""The transport-free tensors: the checks every adapter runs where the bytes are (names,
datatypes, shapes and sizes, before anything is allocated), raw (row-major, no padding) bytes to
arrays and back, and the pipeline's check of a DecodedRequest (gateway/request/decoded.py)
against the version's spec (LayoutChecks, with a bounded cache of layouts checked)."""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Sequence
from typing import Final

import numpy as np

from gateway.errors import InvalidRequestError
from gateway.models.served import ServedVersion
from gateway.request.decoded import DecodedRequest, RequestLayout
from gateway.sanitize import echoed
from model_store.datatypes import DataType
from model_store.spec import ModelSpec
from runtimes.base import InferRequest, Tensor

MAX_RANK: Final = 16
MAX_TENSORS: Final = 128
# No message can carry more elements than it has bytes (the receive limit is below 2**31),
# so a larger claimed count is rejected before any arithmetic reaches numpy or a runtime.
MAX_ELEMENTS: Final = 2**31 - 1
MAX_NAME: Final = 256
LENGTH_PREFIX: Final = struct.Struct("<I")
# Layouts whose check against a version's spec is remembered, per version; and versions
# remembered. Enough for every batch size and output subset of real clients, bounded against
# hostile variety (a full table starts over).
MAX_LAYOUTS: Final = 256
MAX_VERSIONS: Final = 256
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
    name: str, datatype: DataType, shape: tuple[int, ...], data: bytes | bytearray | memoryview
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
    name: str, shape: tuple[int, ...], count: int, data: bytes | bytearray | memoryview
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


def check_request(spec: ModelSpec, decoded: DecodedRequest) -> int:
    """Check a decoded request against ``spec``: each input's name, datatype and shape
    against the declared dims, rows within max_batch_size, every declared input present,
    the requested outputs declared. Returns the row count (1 for unbatched models)."""
    layout = decoded.layout
    rows = spec.check_inputs({name: (datatype, shape)
                              for name, datatype, shape in layout.inputs})
    if decoded.invalid is not None:
        raise decoded.invalid
    spec.check_outputs(layout.outputs)
    return rows


class LayoutChecks:
    """The pipeline's spec check with memory: the row count of each layout a version
    accepted is kept, so a request of a known layout costs a dict lookup. Only accepted
    layouts are kept; a rejected one is checked (and rejected) every time. When the table
    of versions is full, those that have gone (runtime unloaded) are dropped first."""

    __slots__ = ("_limit", "_versions")

    def __init__(self, limit: int = MAX_VERSIONS) -> None:
        self._versions: dict[ServedVersion, dict[RequestLayout, int]] = {}
        self._limit = limit

    def check(self, version: ServedVersion, decoded: DecodedRequest) -> InferRequest:
        """The decoded request, its rows set, once it fits ``version``'s spec; raises
        InputMismatchError (the spec's verdict) or the adapter's deferred InvalidRequestError."""
        layouts = self._versions.get(version)
        if layouts is None:
            layouts = self._table(version)
        rows = layouts.get(decoded.layout)
        if rows is None:
            rows = check_request(version.spec, decoded)
            if len(layouts) >= MAX_LAYOUTS:
                layouts.clear()
            layouts[decoded.layout] = rows
        elif decoded.invalid is not None:
            raise decoded.invalid
        request = decoded.request
        request.rows = rows
        return request

    def _table(self, version: ServedVersion) -> dict[RequestLayout, int]:
        if len(self._versions) >= self._limit:
            gone = [v for v in self._versions if v.runtime is None]
            for old in gone or list(self._versions)[: self._limit // 2]:
                del self._versions[old]
        layouts: dict[RequestLayout, int] = {}
        self._versions[version] = layouts
        return layouts
