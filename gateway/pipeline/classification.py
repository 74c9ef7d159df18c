"""Triton's classification extension: an output requested with a class count comes back as
a BYTES tensor of its k highest-valued classes per row, each "value:index[:label]"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

import numpy as np

from gateway.errors import InvalidRequestError
from model_store.datatypes import DataType
from model_store.spec import ModelSpec, TensorSpec
from runtimes.base import Tensor

# The types whose values order as numbers (BF16 travels as its bits and is widened first).
_NUMERIC: Final = frozenset(DataType) - {DataType.BOOL, DataType.BYTES}
_FLOATS: Final = frozenset({DataType.FP16, DataType.FP32, DataType.FP64, DataType.BF16})


def class_count(output: str, value: object) -> int:
    """A request's class count for ``output``, which must be a positive integer."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InvalidRequestError(
            f"output '{output}': classification must be a positive integer count"
        )
    return value


def check_classes(spec: ModelSpec, classes: Mapping[str, int]) -> None:
    """Refuse a classification of an output that is undeclared or not numeric."""
    for name in classes:
        datatype = _output(spec, name).datatype
        if datatype not in _NUMERIC:
            raise InvalidRequestError(
                f"output '{name}' is {datatype.value}; classification needs a numeric output"
            )


def output_types(spec: ModelSpec, classes: Mapping[str, int]) -> dict[str, DataType]:
    """Each declared output's datatype as answered: BYTES for the classified ones."""
    return {t.name: DataType.BYTES if t.name in classes else t.datatype for t in spec.outputs}


def classify(
    spec: ModelSpec, outputs: Mapping[str, Tensor], classes: Mapping[str, int]
) -> dict[str, Tensor]:
    """``outputs`` with each classified one replaced by its top classes: shape [rows, k']
    for a batching model (each row's elements ranked together), [k'] otherwise, where k' is
    the count asked for or the elements a row has, whichever is smaller."""
    answered = dict(outputs)
    for name, count in classes.items():
        if name in answered:
            answered[name] = _top(_output(spec, name), answered[name], count, spec.batched)
    return answered


def _top(tensor: TensorSpec, array: Tensor, count: int, batched: bool) -> Tensor:
    rows = array.shape[0] if batched and array.ndim else 1
    values = array.reshape(rows, -1)
    if tensor.datatype is DataType.BF16:  # bits: widen to the float32 they are the top of
        values = (values.astype(np.uint32) << 16).view(np.float32)
    width = values.shape[1]
    kept = min(count, width)
    # Highest first; among equal values the lower index first (a stable sort of the
    # reversed row, read backwards).
    order = (width - 1) - np.argsort(values[:, ::-1], axis=1, kind="stable")[:, ::-1]
    order = order[:, :kept]
    floats = tensor.datatype in _FLOATS
    labels = tensor.labels
    answer = np.empty((rows, kept), dtype=object)
    for row in range(rows):
        line = values[row]
        for column, index in enumerate(order[row].tolist()):
            value = line[index]
            text = f"{float(value):f}:{index}" if floats else f"{int(value)}:{index}"
            if index < len(labels):
                text = f"{text}:{labels[index]}"
            answer[row, column] = text.encode()
    return answer if batched else answer.reshape(kept)


def _output(spec: ModelSpec, name: str) -> TensorSpec:
    for tensor in spec.outputs:
        if tensor.name == name:
            return tensor
    raise InvalidRequestError(f"model '{spec.name}' has no output '{name}' to classify")
