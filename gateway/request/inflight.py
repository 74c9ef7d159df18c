"""Overload shedding: a cap on concurrent in-flight inference RPCs (ModelInfer), answered
at once with RESOURCE_EXHAUSTED when reached; health, metadata and reflection never wait."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from gateway.errors import RETRY_AFTER_KEY, OverloadedError


class InflightLimit:
    """Counts in-flight RPCs against ``limit`` (0: unlimited). Single event loop: no lock."""

    def __init__(self, limit: int, clock: Callable[[], float] = time.perf_counter) -> None:
        self.limit = limit
        self.inflight = 0
        self.rejected = 0
        self._clock = clock
        self._mean_s = 0.0  # moving average of admitted RPCs' durations, for retry hints

    def enter(self) -> float:
        """Admit one RPC (returns its start time) or raise OverloadedError."""
        if self.limit and self.inflight >= self.limit:
            self.rejected += 1
            # No modelgate-limit trailer: that one names a tenant's quota (counted as such).
            raise OverloadedError(
                f"the gateway is at its limit of {self.limit} concurrent inference "
                "requests; retry shortly",
                trailers={RETRY_AFTER_KEY: str(self.retry_after_ms())},
            )
        self.inflight += 1
        return self._clock()

    def leave(self, started: float) -> None:
        self.inflight -= 1
        elapsed = self._clock() - started
        self._mean_s = elapsed if not self._mean_s else 0.9 * self._mean_s + 0.1 * elapsed

    def retry_after_ms(self) -> int:
        # One typical RPC's time: by then, about one slot per finished RPC is free again.
        return max(1, math.ceil(self._mean_s * 1000))
