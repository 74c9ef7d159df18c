"""The V2 tensor datatypes and their three spellings: the V2 name ("FP32"), the model
config enum name ("TYPE_FP32") and the numpy dtype used to hold the data."""

from __future__ import annotations

import enum
from typing import Final

import numpy as np


class DataType(enum.Enum):
    """A V2 datatype; the value is its wire name."""

    BOOL = "BOOL"
    UINT8 = "UINT8"
    UINT16 = "UINT16"
    UINT32 = "UINT32"
    UINT64 = "UINT64"
    INT8 = "INT8"
    INT16 = "INT16"
    INT32 = "INT32"
    INT64 = "INT64"
    FP16 = "FP16"
    FP32 = "FP32"
    FP64 = "FP64"
    BF16 = "BF16"
    BYTES = "BYTES"

    @property
    def config_name(self) -> str:
        """The name in config.pbtxt (``TYPE_FP32``; BYTES is ``TYPE_STRING`` there)."""
        return "TYPE_STRING" if self is DataType.BYTES else f"TYPE_{self.value}"

    @property
    def itemsize(self) -> int:
        """Bytes per element in raw contents; 0 for BYTES, whose elements vary in size."""
        return _ITEMSIZE[self]

    @property
    def numpy_dtype(self) -> np.dtype[np.generic]:
        """The little-endian numpy dtype holding this type (object for BYTES, uint16 bits
        for BF16, which numpy cannot compute with)."""
        return _NUMPY[self]

    @property
    def contents_field(self) -> str | None:
        """The InferTensorContents field carrying this type as typed contents; None for
        FP16 and BF16, which travel only as raw bytes."""
        return _CONTENTS_FIELD.get(self)

    @classmethod
    def from_wire(cls, name: str) -> DataType:
        """Parse a V2 datatype name; raises ValueError for anything else."""
        return cls(name)

    @classmethod
    def from_config(cls, name: str) -> DataType:
        """Parse a config.pbtxt ``TYPE_*`` name; raises ValueError for anything else."""
        try:
            return _FROM_CONFIG[name]
        except KeyError:
            raise ValueError(f"unsupported data_type {name}") from None

    @classmethod
    def from_numpy(cls, dtype: np.dtype[np.generic]) -> DataType:
        """The datatype of a numpy array's dtype; raises ValueError if there is none."""
        if dtype.kind in "OSU":
            return DataType.BYTES
        try:
            return _FROM_NUMPY[dtype.newbyteorder("<") if dtype.byteorder == ">" else dtype]
        except KeyError:
            raise ValueError(f"numpy dtype {dtype} has no V2 datatype") from None


_ITEMSIZE: Final = {
    DataType.BOOL: 1,
    DataType.UINT8: 1,
    DataType.UINT16: 2,
    DataType.UINT32: 4,
    DataType.UINT64: 8,
    DataType.INT8: 1,
    DataType.INT16: 2,
    DataType.INT32: 4,
    DataType.INT64: 8,
    DataType.FP16: 2,
    DataType.FP32: 4,
    DataType.FP64: 8,
    DataType.BF16: 2,
    DataType.BYTES: 0,
}

_NUMPY: Final[dict[DataType, np.dtype[np.generic]]] = {
    DataType.BOOL: np.dtype(np.bool_),
    DataType.UINT8: np.dtype("<u1"),
    DataType.UINT16: np.dtype("<u2"),
    DataType.UINT32: np.dtype("<u4"),
    DataType.UINT64: np.dtype("<u8"),
    DataType.INT8: np.dtype("<i1"),
    DataType.INT16: np.dtype("<i2"),
    DataType.INT32: np.dtype("<i4"),
    DataType.INT64: np.dtype("<i8"),
    DataType.FP16: np.dtype("<f2"),
    DataType.FP32: np.dtype("<f4"),
    DataType.FP64: np.dtype("<f8"),
    DataType.BF16: np.dtype("<u2"),
    DataType.BYTES: np.dtype(object),
}

_FROM_CONFIG: Final = {dt.config_name: dt for dt in DataType}
_FROM_NUMPY: Final = {
    dtype: dt for dt, dtype in _NUMPY.items() if dt not in (DataType.BF16, DataType.BYTES)
}

_CONTENTS_FIELD: Final = {
    DataType.BOOL: "bool_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}
CONTENTS_FIELDS: Final = frozenset(_CONTENTS_FIELD.values())
