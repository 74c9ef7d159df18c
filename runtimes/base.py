"""The Runtime interface (load, infer, unload, metadata) and the request it executes.
Batching, tracing and metrics wrap a Runtime; they are not written into each one."""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from model_store.spec import ModelId, ModelSpec

Tensor = npt.NDArray[np.generic]
TensorMap = Mapping[str, Tensor]


@dataclass(slots=True)
class InferRequest:
    """One request's tensors plus the scheduling hints a wrapper may use.

    ``outputs`` empty means every declared output. ``rows`` is the batch dimension (1 for
    unbatched models). ``deadline`` is on the monotonic clock (None: none). Plain runtimes
    ignore priority, timeout and deadline; the batcher honours them.

    ``trace_headers``: the W3C headers (traceparent, tracestate) a runtime that calls
    another service (Triton) sends along. ``warmup``: the warm-up sample's name when the
    request is a warm-up rather than traffic (not counted). ``members``: a batch merged by
    the batcher carries the requests it merged, so wrappers below it reach each one.
    ``context``: the caller's context, opaque here; the gateway reads it through
    gateway/request/context.py. ``ran_ns``: when the model itself ran (perf_counter ns,
    start and end), set by a runtime that knows, so statistics can tell waiting from running."""

    inputs: TensorMap
    outputs: tuple[str, ...] = ()
    rows: int = 1
    priority: int = 0
    timeout_us: int | None = None
    deadline: float | None = None
    trace_headers: Mapping[str, str] | None = None
    warmup: str | None = None
    members: tuple[InferRequest, ...] = ()
    context: object = None
    ran_ns: tuple[int, int] | None = None


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
        a remote one (Triton) only while an upstream has the model ready."""
        return True


class RuntimeWrapper(Runtime):
    """The one base of runtime decorators (batching, statistics, observation): the lifecycle,
    metadata and readiness go to ``inner``; a subclass overrides ``infer`` (and whatever
    else it adds to)."""

    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.model = inner.model
        self.spec = inner.spec

    async def load(self) -> None:
        await self.inner.load()

    async def unload(self) -> None:
        await self.inner.unload()

    def metadata(self) -> RuntimeMetadata:
        return self.inner.metadata()

    def ready(self) -> bool:
        return self.inner.ready()
