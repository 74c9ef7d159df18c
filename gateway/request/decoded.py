"""A request as a transport decoded it, before any model's spec is consulted: what it
declares of its tensors (RequestLayout), what it asks of its outputs, the DecodedRequest."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.errors import InvalidRequestError
from model_store.datatypes import DataType
from runtimes.base import InferRequest

# One input as its request declares it: name, V2 datatype, shape.
InputLayout = tuple[str, DataType, tuple[int, ...]]


class RequestLayout:
    """What a request declares of its tensors, independent of any model: each input's name,
    V2 datatype and shape (in request order) and the requested output names. Its hash is
    computed once, so an adapter that reuses one per decode plan makes the pipeline's cache
    lookup an identity check."""

    __slots__ = ("_hash", "inputs", "outputs")

    def __init__(self, inputs: tuple[InputLayout, ...], outputs: tuple[str, ...]) -> None:
        self.inputs = inputs
        self.outputs = outputs
        self._hash = hash((inputs, outputs))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        return (isinstance(other, RequestLayout) and self._hash == other._hash
                and self.inputs == other.inputs and self.outputs == other.outputs)

    def __repr__(self) -> str:
        return f"RequestLayout({self.inputs!r}, {self.outputs!r})"


@dataclass(frozen=True, slots=True)
class MemoryRef:
    """Where a tensor's bytes are: a region's name, an offset into the region, a size."""

    region: str
    offset: int
    byte_size: int


@dataclass(frozen=True, slots=True)
class OutputOptions:
    """What a request asked of its outputs beyond their names (None on a request that asks
    nothing more): ``classes``, the class count of each output answered by classification
    (the classification extension); ``regions``, where in the tenant's shared memory each
    output asked to go there is written (the system shared memory extension)."""

    classes: Mapping[str, int]
    regions: Mapping[str, MemoryRef] = field(default_factory=dict)


@dataclass(slots=True)
class DecodedRequest:
    """A request as its transport decoded it, before any model's spec is consulted.

    ``request``: the arrays by name (in the request's own datatypes and shapes, every claimed
    size checked against the bytes present), the requested outputs and the request's own
    priority and timeout; ``rows`` is the spec check's to set. ``layout``: what each input
    declared, the V2 datatype included (an array's numpy dtype cannot tell BYTES, BF16 or
    FP16-as-bits apart). ``invalid``: what was wrong with the tensors' data once the layout
    was read (a size the bytes do not hold, a bad value, a bad parameter); ``request.inputs``
    is then empty and the pipeline raises it after the model's own signature check, so a
    client hears first what the model wants, as the signature check's messages name it.
    ``options``: what the request asked of its outputs beyond their names, if anything."""

    request: InferRequest
    layout: RequestLayout
    invalid: InvalidRequestError | None = None
    options: OutputOptions | None = None
