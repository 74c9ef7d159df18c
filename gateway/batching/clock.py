"""The monotonic clock the dynamic batcher schedules by: time plus timers on that time, so
tests can drive it with a fake clock instead of waiting."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import sys
import time
import weakref
from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    """A scheduled callback that can be called off."""

    def cancel(self) -> None: ...


class Clock(Protocol):
    """Monotonic time in seconds and a way to be called back at a time on that clock."""

    def now(self) -> float: ...

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer: ...


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


_CLOCK_MONOTONIC = 1  # what time.monotonic reads on Linux
_TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 0o4000, 0o2000000, 1


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class _Armed:
    """One call_at of a MonotonicClock; cancelling it disarms the clock if it is still the
    clock's current timer."""

    __slots__ = ("_clock",)

    def __init__(self, clock: MonotonicClock) -> None:
        self._clock = clock

    def cancel(self) -> None:
        if self._clock._armed is self:
            self._clock._disarm()


class MonotonicClock:
    """time.monotonic and timers on the running event loop (the production clock).

    The loop's own timers count whole milliseconds (libuv's, under uvloop): a wait shorter
    than that fires at once, before it is due, and a batcher that looks again and re-arms
    for the same moment would fire dozens of times before a 500 µs queue delay runs out. On
    Linux the timer is therefore a timerfd the loop watches, set for the very moment asked:
    the loop sleeps until then and wakes once. One timer at a time: calling call_at again
    replaces the one set before (the batcher only ever waits for its next due time)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed: _Armed | None = None
        self._callback: Callable[[], None] | None = None
        self._closing: weakref.finalize | None = None  # type: ignore[type-arg]

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        if _LIBC is None or not self._watch(loop):
            return loop.call_later(max(0.0, when - time.monotonic()), callback)
        assert self._fd is not None
        # A time already past is set 1 ns on: zero would disarm the timer instead.
        seconds, fraction = divmod(max(when, 1e-9), 1.0)
        setting = _Itimerspec(_Timespec(0, 0),
                              _Timespec(int(seconds), max(1, int(fraction * 1e9))))
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, ctypes.byref(setting), None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        self._armed, self._callback = _Armed(self), callback
        return self._armed

    def close(self) -> None:
        """Stop watching and close the timer's descriptor (when the batcher unloads)."""
        if self._fd is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._fd)
        if self._closing is not None:
            self._closing()  # closes the descriptor, once
        self._fd, self._loop, self._armed, self._callback = None, None, None, None

    def _watch(self, loop: asyncio.AbstractEventLoop) -> bool:
        """Whether a timerfd watched by ``loop`` is ready (made on first use)."""
        if self._fd is not None and self._loop is loop:
            return True
        self.close()
        assert _LIBC is not None
        fd = _LIBC.timerfd_create(_CLOCK_MONOTONIC, _TFD_NONBLOCK | _TFD_CLOEXEC)
        if fd < 0:
            return False
        try:
            loop.add_reader(fd, self._fired)
        except (NotImplementedError, OSError):  # a loop that cannot watch descriptors
            os.close(fd)
            return False
        self._fd, self._loop = fd, loop
        self._closing = weakref.finalize(self, _close_quietly, fd)
        return True

    def _disarm(self) -> None:
        self._armed, self._callback = None, None
        if self._fd is not None and _LIBC is not None:
            _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME,
                                  ctypes.byref(_Itimerspec()), None)

    def _fired(self) -> None:
        assert self._fd is not None
        try:
            os.read(self._fd, 8)
        except BlockingIOError:
            return  # re-armed or disarmed after it became readable: not due
        callback = self._callback
        self._armed, self._callback = None, None
        if callback is not None:
            callback()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
