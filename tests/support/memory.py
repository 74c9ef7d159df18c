"""How far a process's resident memory rises during an attack: VmRSS from /proc, sampled
from a thread while the attack runs (the peak above the level just before it)."""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType


def rss_kib(pid: int) -> int:
    """Resident memory of ``pid`` now, in KiB (Linux VmRSS)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


class RssGrowth:
    """``with RssGrowth(pid) as growth: attack()``, then ``growth.peak_kib``: the highest
    VmRSS seen while inside (sampled every ``interval_s``, and once at each end) less the
    VmRSS on entry."""

    def __init__(self, pid: int, interval_s: float = 0.005) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.before_kib = 0
        self.highest_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    @property
    def peak_kib(self) -> int:
        return self.highest_kib - self.before_kib

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.highest_kib = max(self.highest_kib, rss_kib(self.pid))

    def __enter__(self) -> RssGrowth:
        self.before_kib = self.highest_kib = rss_kib(self.pid)
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.highest_kib = max(self.highest_kib, rss_kib(self.pid))
