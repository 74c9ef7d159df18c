"""The Runtime interface (load, infer, unload, metadata) and the request it executes.
Batching, tracing and metrics wrap a Runtime; they are not written into each one."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

import numpy as np
import numpy.typing as npt

from model_store.spec import ModelId, ModelSpec

Tensor = npt.NDArray[np.generic]
TensorMap = Mapping[str, Tensor]

# A merged batch carries its members' ``tags`` dicts under this key of its own tags, so the
# wrappers below a batcher (tracing, metrics) can reach every member request.
MEMBER_TAGS: Final = "members"

# The W3C trace headers (``traceparent``, ``tracestate``: a Mapping[str, str]) a runtime that
# calls another service (Triton) sends along; the gateway puts them in a request's ``tags``.
TRACE_HEADERS_TAG: Final = "trace_headers"


@dataclass(slots=True)
class InferRequest:
    """One request's tensors plus the scheduling hints a wrapper may use.

    ``outputs`` empty means every declared output. ``rows`` is the batch dimension (1 for
    unbatched models). ``deadline`` is on the monotonic clock (None: none). Plain runtimes
    ignore priority, timeout and deadline; the batcher honours them."""

    inputs: TensorMap
    outputs: tuple[str, ...] = ()
    rows: int = 1
    priority: int = 0
    timeout_us: int | None = None
    deadline: float | None = None
    tags: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RuntimeMetadata:
    """What a loaded runtime reports about itself."""

    model: ModelId
    platform: str
    device: str
    instances: int


class Runtime(abc.ABC):
    """Executes one model version. ``infer`` may run concurrently up to the runtime's
    instance count; callers that need ordering or batching wrap it."""

    model: ModelId
    spec: ModelSpec

    @abc.abstractmethod
    async def load(self) -> None:
        """Load (and warm) the model; raises ModelLoadError."""

    @abc.abstractmethod
    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        """Run one request (or one merged batch) and return the requested outputs."""

    @abc.abstractmethod
    async def unload(self) -> None:
        """Release the model. Requests already running finish first."""

    @abc.abstractmethod
    def metadata(self) -> RuntimeMetadata:
        """Describe the loaded runtime."""

    def ready(self) -> bool:
        """Whether the loaded runtime can take requests now. In-process runtimes always can;
        a remote one (Triton) only while an upstream has the model ready. A wrapper (a
        runtime whose ``inner`` is the runtime it wraps) answers for what it wraps."""
        inner = getattr(self, "inner", None)
        return inner.ready() if isinstance(inner, Runtime) else True
