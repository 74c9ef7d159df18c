"""The value types a served model is described by: ModelId, TensorSpec, the batching and
queue policy, and ModelSpec, which checks request tensors against the declared signature."""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from model_store.datatypes import DataType
from model_store.errors import InputMismatchError, InvalidModelNameError

# A model name is a single path component, so nothing a client sends can walk the file system.
_MODEL_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")


def validate_model_name(name: str) -> str:
    """Return ``name`` if it can name a model folder, else raise InvalidModelNameError."""
    if not _MODEL_NAME.fullmatch(name) or ".." in name:
        raise InvalidModelNameError(
            "model name must be 1-128 characters of letters, digits, '_', '.' or '-', "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True, slots=True, order=True)
class ModelId:
    """One version of one model."""

    name: str
    version: int

    def __str__(self) -> str:
        return f"{self.name}/{self.version}"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A declared input or output. ``dims`` excludes the batch dimension when the model
    batches; -1 is a dimension of any size. ``labels``: an output's class labels (its
    label_filename's lines, class i on line i), for the classification extension."""

    name: str
    datatype: DataType
    dims: tuple[int, ...]
    labels: tuple[str, ...] = ()


class TimeoutAction(enum.Enum):
    """What happens to a queued request whose queue timeout passes (Triton's meaning)."""

    REJECT = "REJECT"
    DELAY = "DELAY"


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    """Triton's ModelQueuePolicy: 0 means unlimited for both size and timeout."""

    max_queue_size: int = 0
    default_timeout_us: int = 0
    allow_timeout_override: bool = False
    timeout_action: TimeoutAction = TimeoutAction.REJECT


@dataclass(frozen=True, slots=True)
class DynamicBatchingSpec:
    """Triton's dynamic_batching block. Priority levels are 1..priority_levels, 1 highest;
    0 levels means a single queue."""

    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_levels: int = 0
    default_priority_level: int = 0
    priority_queue_policy: Mapping[int, QueuePolicy] = field(default_factory=dict)

    def queue_policy(self, level: int) -> QueuePolicy:
        """The policy of one priority level (the default policy unless overridden)."""
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """Everything the gateway and runtimes need to know about one model, read once from
    config.pbtxt (or derived from the model file). ``config`` is the serialized Triton
    ModelConfig message, answered as-is by the ModelConfig RPC."""

    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    instance_count: int = 1
    dynamic_batching: DynamicBatchingSpec | None = None
    parameters: Mapping[str, str] = field(default_factory=dict)
    default_model_filename: str = "model.onnx"
    config: bytes = b""

    @property
    def batched(self) -> bool:
        """Whether the first dimension of every tensor is the batch (rows) dimension."""
        return self.max_batch_size > 0

    def full_shape(self, tensor: TensorSpec) -> tuple[int, ...]:
        """The tensor's shape as clients see it, batch dimension (-1) included."""
        return (-1, *tensor.dims) if self.batched else tensor.dims

    def input(self, name: str) -> TensorSpec:
        """The declared input called ``name``."""
        for spec in self.inputs:
            if spec.name == name:
                return spec
        expected = ", ".join(s.name for s in self.inputs)
        raise InputMismatchError(
            f"model '{self.name}' has no input '{name}' (expected one of: {expected})"
        )

    def check_outputs(self, names: Sequence[str]) -> None:
        """Raise InputMismatchError unless every requested output name is declared once."""
        declared = {s.name for s in self.outputs}
        seen: set[str] = set()
        for name in names:
            if name not in declared:
                raise InputMismatchError(
                    f"model '{self.name}' has no output '{name}' "
                    f"(expected one of: {', '.join(sorted(declared))})"
                )
            if name in seen:
                raise InputMismatchError(f"output '{name}' is requested more than once")
            seen.add(name)

    def check_inputs(self, given: Mapping[str, tuple[DataType, tuple[int, ...]]]) -> int:
        """Check each given input's datatype and shape against the declaration and that
        every declared input is present. Returns the row count (1 for unbatched models)."""
        rows: int | None = None
        for name, (datatype, shape) in given.items():
            spec = self.input(name)
            if datatype is not spec.datatype:
                raise InputMismatchError(
                    f"input '{name}': expected datatype {spec.datatype.value}, "
                    f"got {datatype.value}"
                )
            expected = self.full_shape(spec)
            if len(shape) != len(expected):
                raise InputMismatchError(
                    f"input '{name}': expected shape {_fmt(expected)} "
                    f"(rank {len(expected)}), got {_fmt(shape)} (rank {len(shape)})"
                )
            for axis, (want, got) in enumerate(zip(expected, shape, strict=True)):
                if want not in (-1, got):
                    raise InputMismatchError(
                        f"input '{name}': expected shape {_fmt(expected)}, got {_fmt(shape)} "
                        f"(dimension {axis} must be {want})"
                    )
            if self.batched:
                if shape[0] < 1:
                    raise InputMismatchError(f"input '{name}': batch dimension must be >= 1")
                if shape[0] > self.max_batch_size:
                    raise InputMismatchError(
                        f"input '{name}': batch size {shape[0]} exceeds the model's "
                        f"max_batch_size {self.max_batch_size}"
                    )
                if rows is not None and rows != shape[0]:
                    raise InputMismatchError(
                        f"input '{name}': batch size {shape[0]} differs from the other "
                        f"inputs' batch size {rows}"
                    )
                rows = shape[0]
        missing = [s.name for s in self.inputs if s.name not in given]
        if missing:
            raise InputMismatchError(
                f"model '{self.name}' needs input(s) {', '.join(missing)}, which the request lacks"
            )
        return rows if rows is not None else 1


def _fmt(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"
