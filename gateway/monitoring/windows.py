"""Sliding windows over one version's statistics: a bucket per minute kept for an hour, so
the last 5 minutes and the last hour are merges of recent buckets, plus a running total
since the version started being monitored."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from gateway.monitoring.accumulator import TensorStats, TensorTracker

BUCKET_S: Final = 60.0
# Window name -> seconds it covers (None: since start).
WINDOWS: Final[dict[str, float | None]] = {"5m": 300.0, "1h": 3600.0, "all": None}
DEFAULT_WINDOW: Final = "5m"


@dataclass(frozen=True, slots=True)
class WindowView:
    """Merged statistics of one window: per tracker, and the span they cover (unix
    seconds; start is the beginning of the oldest bucket that holds data)."""

    name: str
    stats: tuple[TensorStats, ...]
    start: float
    end: float

    @property
    def rows(self) -> int:
        return max((s.rows for s in self.stats), default=0)


class Windows:
    """Buckets of per-tracker TensorStats. Not thread-safe: the monitor's lock guards it."""

    def __init__(self, trackers: Sequence[TensorTracker],
                 clock: Callable[[], float] = time.time) -> None:
        self._trackers = tuple(trackers)
        self._clock = clock
        self._buckets: deque[tuple[int, list[TensorStats]]] = deque()
        self._total = [t.empty() for t in self._trackers]
        self._started = clock()

    def bucket(self) -> list[TensorStats]:
        """The current minute's stats to add rows to (old buckets are dropped here)."""
        key = int(self._clock() // BUCKET_S)
        if not self._buckets or self._buckets[-1][0] != key:
            self._buckets.append((key, [t.empty() for t in self._trackers]))
            horizon = key - int(3600.0 // BUCKET_S)
            while self._buckets and self._buckets[0][0] <= horizon:
                self._buckets.popleft()
        return self._buckets[-1][1]

    def add(self, index: int, stats: TensorStats) -> None:
        """Add one tracker's stats of a batch of samples to the current bucket and total."""
        self.bucket()[index].merge(stats)
        self._total[index].merge(stats)

    def view(self, name: str) -> WindowView:
        """The merged window ``name`` (a key of WINDOWS)."""
        now = self._clock()
        span = WINDOWS[name]
        if span is None:
            return WindowView(name, tuple(s.copy() for s in self._total), self._started, now)
        first = int((now - span) // BUCKET_S) + 1
        merged = [t.empty() for t in self._trackers]
        start = now
        for key, stats in self._buckets:
            if key < first:
                continue
            start = min(start, key * BUCKET_S)
            for mine, theirs in zip(merged, stats, strict=True):
                mine.merge(theirs)
        return WindowView(name, tuple(merged), max(start, self._started), now)
