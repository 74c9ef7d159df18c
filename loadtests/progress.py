"""A progress bar on stderr for benchmark runs of planned length: the share of the planned
seconds done, elapsed and remaining time, and the level being measured."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import TextIO

_WIDTH = 30
_REDRAW_S = 0.25


def _clock(seconds: float) -> str:
    minutes, secs = divmod(max(0, round(seconds)), 60)
    return f"{minutes}:{secs:02d}"


class Progress:
    """Steps of known length add up to ``planned_s``. On a terminal a background thread
    redraws one line in place (it is cleared when a step ends, so rows printed between
    steps stay readable); elsewhere each step prints one line as it starts."""

    def __init__(self, planned_s: float, stream: TextIO | None = None) -> None:
        self.planned_s = max(planned_s, 1e-9)
        self._stream = stream or sys.stderr
        self._live = bool(getattr(self._stream, "isatty", lambda: False)())
        self._started = time.monotonic()
        self._done_s = 0.0  # planned seconds of the finished steps
        self._step: tuple[str, float, float] | None = None  # label, planned s, start
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def fraction(self) -> float:
        with self._lock:
            done = self._done_s
            if self._step is not None:
                _, planned, began = self._step
                done += min(planned, time.monotonic() - began)
        return min(1.0, done / self.planned_s)

    def line(self) -> str:
        fraction = self.fraction()
        filled = round(fraction * _WIDTH)
        elapsed = time.monotonic() - self._started
        left = elapsed / fraction - elapsed if fraction > 0.01 else self.planned_s - elapsed
        label = self._step[0] if self._step else ""
        return (f"[{'#' * filled}{'.' * (_WIDTH - filled)}] {100 * fraction:3.0f}%  "
                f"{_clock(elapsed)} elapsed, ~{_clock(left)} left  {label}")

    def _draw(self) -> None:
        while not self._stop.wait(_REDRAW_S):
            self._write("\r\x1b[K" + self.line())

    def _write(self, text: str) -> None:
        with contextlib.suppress(ValueError, OSError):  # a closed stream ends the bar quietly
            self._stream.write(text)
            self._stream.flush()

    @contextlib.contextmanager
    def step(self, label: str, seconds: float) -> Iterator[None]:
        """A step expected to take ``seconds``."""
        with self._lock:
            self._step = (label, seconds, time.monotonic())
        if self._live:
            self._stop.clear()
            self._thread = threading.Thread(target=self._draw, name="progress", daemon=True)
            self._thread.start()
        else:
            self._write(f"[{100 * self.fraction():3.0f}%] {label} ({seconds:g} s)\n")
        try:
            yield
        finally:
            if self._thread is not None:
                self._stop.set()
                self._thread.join()
                self._thread = None
                self._write("\r\x1b[K")
            with self._lock:
                self._done_s += seconds
                self._step = None

    @staticmethod
    @contextlib.contextmanager
    def step_of(progress: Progress | None, label: str, seconds: float) -> Iterator[None]:
        """``progress.step(...)``, or nothing when there is no progress bar."""
        if progress is None:
            yield
        else:
            with progress.step(label, seconds):
                yield
