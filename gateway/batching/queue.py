"""The dynamic batcher's queue entries and its per-shape queues: one FIFO per priority level
plus that level's delayed requests, with lazy removal of withdrawn ones."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

from runtimes.base import InferRequest, Tensor

# Requests share a batch only when every input has the same dtype and non-batch dims.
ShapeKey = tuple[tuple[str, str, tuple[int, ...]], ...]


@dataclass(slots=True, eq=False)
class QueuedRequest:
    """A queued request. ``state``: queued, delayed (its queue timeout passed under DELAY),
    running, or gone (answered or withdrawn before running)."""

    request: InferRequest
    future: asyncio.Future[dict[str, Tensor]]
    level: int
    key: ShapeKey
    seq: int
    enqueued: float
    state: str = "queued"

    @property
    def waiting(self) -> bool:
        return self.state in ("queued", "delayed") and not self.future.done()


@dataclass(slots=True)
class ShapeQueue:
    """Requests of one shape; per priority level a FIFO queue and a queue of delayed ones.
    Removed entries stay in the deques until they reach the front (lazy deletion)."""

    queued: dict[int, deque[QueuedRequest]] = field(default_factory=dict)
    delayed: dict[int, deque[QueuedRequest]] = field(default_factory=dict)

    def ordered(self) -> Iterator[QueuedRequest]:
        """Waiting entries in dispatch order: level 1 first, within a level the queued
        ones in arrival order, then that level's delayed ones (Triton's DELAY)."""
        for level in sorted(self.queued.keys() | self.delayed.keys()):
            for queue, state in (
                (self.queued.get(level), "queued"),
                (self.delayed.get(level), "delayed"),
            ):
                for entry in queue or ():
                    if entry.state == state and entry.waiting:
                        yield entry

    def prune(self) -> bool:
        """Drop removed entries at the fronts; True when the group holds none any more."""
        for queues, state in ((self.queued, "queued"), (self.delayed, "delayed")):
            for level in list(queues):
                queue = queues[level]
                while queue and not (queue[0].state == state and queue[0].waiting):
                    queue.popleft()
                if not queue:
                    del queues[level]
        return not self.queued and not self.delayed

    def oldest(self) -> float:
        """Arrival time of the oldest waiting entry (call after prune)."""
        heads = [q[0].enqueued for q in (*self.queued.values(), *self.delayed.values())]
        return min(heads)

    def head(self) -> tuple[int, int]:
        """(level, seq) of the entry that would go first (call after prune)."""
        level = min(self.queued.keys() | self.delayed.keys())
        queue = self.queued.get(level) or self.delayed[level]
        return level, queue[0].seq


def shape_key(request: InferRequest) -> ShapeKey:
    inputs = request.inputs
    if len(inputs) == 1:  # the common case, without sorting
        for name, array in inputs.items():
            return ((name, array.dtype.str, array.shape[1:]),)
    return tuple(
        (name, array.dtype.str, tuple(array.shape[1:]))
        for name, array in sorted(inputs.items())
    )
