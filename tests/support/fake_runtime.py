"""A fake Runtime for scheduler tests: records every call, can hold calls until released
and fail on cue; plus a fake monotonic clock whose timers fire only when advanced."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from model_store.spec import ModelId, ModelSpec
from runtimes.base import InferRequest, Runtime, RuntimeMetadata, Tensor


def fake_outputs(spec: ModelSpec, request: InferRequest) -> dict[str, Tensor]:
    """Output number i (declaration order) is ``first input * (i + 1)``: a row's answer
    depends on that row only, like a real model's."""
    first = next(iter(request.inputs.values()))
    names = request.outputs or tuple(o.name for o in spec.outputs)
    index = {o.name: i for i, o in enumerate(spec.outputs)}
    return {name: np.asarray(first * (index[name] + 1)) for name in names}


class FakeRuntime(Runtime):
    """Calls are recorded in ``calls``; with ``hold`` set each call waits for release()."""

    def __init__(self, spec: ModelSpec, version: int = 1) -> None:
        self.model = ModelId(spec.name, version)
        self.spec = spec
        self.calls: list[InferRequest] = []
        self.hold = False
        self.fail_next: Exception | None = None
        # Called with every request the runtime gets: an exception it returns is raised.
        self.check: Callable[[InferRequest], Exception | None] | None = None
        self.loaded = False
        self.unloaded = False
        self.running = 0
        self.max_running = 0
        self._gates: list[asyncio.Future[None]] = []
        self._changed = asyncio.Event()

    async def load(self) -> None:
        self.loaded = True

    async def infer(self, request: InferRequest) -> dict[str, Tensor]:
        self.calls.append(request)
        self.running += 1
        self.max_running = max(self.max_running, self.running)
        self._changed.set()
        try:
            if self.hold:
                gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._gates.append(gate)
                await gate
            if self.fail_next is not None:
                exc, self.fail_next = self.fail_next, None
                raise exc
            problem = self.check(request) if self.check is not None else None
            if problem is not None:
                raise problem
            return fake_outputs(self.spec, request)
        finally:
            self.running -= 1

    async def unload(self) -> None:
        self.unloaded = True

    def metadata(self) -> RuntimeMetadata:
        return RuntimeMetadata(self.model, "fake", "CPU", max(1, self.spec.instance_count))

    async def wait_calls(self, count: int) -> None:
        """Return once ``count`` calls have started (no timing involved: it waits for the
        scheduler's tasks to reach the runtime)."""
        while len(self.calls) < count:
            self._changed.clear()
            await self._changed.wait()

    def release(self, count: int | None = None) -> int:
        """Let the held calls (the first ``count`` of them) finish; returns how many."""
        gates = self._gates if count is None else self._gates[:count]
        self._gates = self._gates[len(gates) :]
        for gate in gates:
            gate.set_result(None)
        return len(gates)


@dataclass(order=True)
class _Timer:
    when: float
    seq: int
    callback: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class FakeClock:
    """A monotonic clock that moves only when told; timers fire inside advance()."""

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._timers: list[_Timer] = []
        self._seq = 0

    def now(self) -> float:
        return self._now

    def call_at(self, when: float, callback: Callable[[], None]) -> _Timer:
        self._seq += 1
        timer = _Timer(when, self._seq, callback)
        self._timers.append(timer)
        return timer

    def advance(self, seconds: float) -> None:
        """Move time forward, firing due timers in time order at their own times."""
        target = self._now + seconds
        while True:
            due = sorted(t for t in self._timers if not t.cancelled and t.when <= target)
            if not due:
                break
            timer = due[0]
            self._timers.remove(timer)
            self._now = max(self._now, timer.when)
            timer.callback()
        self._timers = [t for t in self._timers if not t.cancelled]
        self._now = target

    def armed(self) -> list[float]:
        """When the pending timers fire."""
        return sorted(t.when for t in self._timers if not t.cancelled)
