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


# How long before the time asked the timerfd wakes the loop: about what a woken thread takes
# to run again on a busy 2-core machine (24-47 µs median, 59-72 µs at the 90th percentile,
# measured under uvloop). The loop turns through that last stretch without sleeping: at most
# this much busy waiting per wait, instead of the whole delay's.
WAKE_UP_S = 50e-6
_CLOCK_MONOTONIC = 1  # what time.monotonic reads on Linux
_TFD_NONBLOCK, _TFD_CLOEXEC, _TFD_TIMER_ABSTIME = 0o4000, 0o2000000, 1


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        # PyDLL keeps the GIL across the call: these syscalls never block, and a CDLL call
        # hands the GIL to another thread (the runtime's, gRPC's poller) and waits to win
        # it back, which at 32 callers held the loop about 5 µs per request.
        libc = ctypes.PyDLL(None, use_errno=True)
        libc.timerfd_create.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.timerfd_settime.argtypes = [ctypes.c_int, ctypes.c_int,
                                         ctypes.POINTER(_Itimerspec), ctypes.c_void_p]
        libc.read.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
        libc.read.restype = ctypes.c_ssize_t
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _libc()


class _Armed:
    """One call_at of a MonotonicClock; cancelling it drops the callback if it is still the
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
    Linux the timer is therefore a timerfd the loop watches, set WAKE_UP_S before the moment
    asked: the loop sleeps until then, and turns (without sleeping) for the few µs left, so
    the callback runs once, never early, and about as soon as a busy loop would have run it.
    One timer at a time: calling call_at again replaces the one set before (the batcher only
    ever waits for its next due time)."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._armed: _Armed | None = None
        self._callback: Callable[[], None] | None = None
        self._when = 0.0
        self._closing: weakref.finalize | None = None  # type: ignore[type-arg]
        self._setting = _Itimerspec()  # reused: one settime per arming, nothing built
        self._pointer = ctypes.pointer(self._setting)
        self._expirations = ctypes.c_uint64()  # what a read of the timerfd fills

    def now(self) -> float:
        return time.monotonic()

    def call_at(self, when: float, callback: Callable[[], None]) -> Timer:
        loop = asyncio.get_running_loop()
        if _LIBC is None or not self._watch(loop):
            return loop.call_later(max(0.0, when - time.monotonic()), callback)
        assert self._fd is not None
        armed = self._armed = _Armed(self)
        self._callback, self._when = callback, when
        if when - time.monotonic() <= WAKE_UP_S:
            loop.call_soon(self._finish, armed)
            return armed
        # Set to wake WAKE_UP_S early: a sleeping thread takes about that long to run
        # again; _finish waits out what is left.
        seconds, fraction = divmod(when - WAKE_UP_S, 1.0)
        value = self._setting.it_value
        value.tv_sec, value.tv_nsec = int(seconds), max(1, int(fraction * 1e9))
        if _LIBC.timerfd_settime(self._fd, _TFD_TIMER_ABSTIME, self._pointer, None):
            err = ctypes.get_errno()
            raise OSError(err, f"timerfd_settime: {os.strerror(err)}")
        return armed

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
        # The descriptor stays set: the batcher mostly arms again soon (settime replaces
        # it), and a firing with nothing armed is read and ignored.
        self._armed, self._callback = None, None

    def _fired(self) -> None:
        assert self._fd is not None and _LIBC is not None
        # Read through libc, not os.read, which would let go of the GIL (see _libc).
        if _LIBC.read(self._fd, ctypes.byref(self._expirations), 8) != 8:
            return  # re-armed or disarmed after it became readable: not due
        if self._armed is not None:
            self._finish(self._armed)

    def _finish(self, armed: _Armed) -> None:
        """Calls back once the time has come, turn by turn of the loop until then."""
        if self._armed is not armed:
            return  # cancelled or replaced
        if time.monotonic() < self._when:
            assert self._loop is not None
            self._loop.call_soon(self._finish, armed)
            return
        callback = self._callback
        self._armed, self._callback = None, None
        if callback is not None:
            callback()


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)
