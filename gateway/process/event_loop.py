"""Which asyncio event loop a serving process runs: uvloop (libuv, its scheduling in C) when
installed and asked for, else the standard library's; and running a coroutine on it.

Per request the loop schedules a dozen callbacks (gRPC completions, futures, timers); the
standard loop does that in Python, uvloop in C, which is worth ~15 % of a core here."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Final, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
CHOICES: Final = ("auto", "uvloop", "asyncio")


class EventLoopError(Exception):
    """The event loop asked for is not available."""


def uvloop_available() -> bool:
    return importlib.util.find_spec("uvloop") is not None


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The factory of the loop ``choice`` names (None: the standard library's). ``auto``
    takes uvloop when it is installed; ``uvloop`` insists on it."""
    if choice not in CHOICES:
        raise EventLoopError(f"event loop must be one of {', '.join(CHOICES)}, not {choice!r}")
    if choice == "asyncio" or (choice == "auto" and not uvloop_available()):
        return None
    try:
        import uvloop
    except ImportError as exc:
        raise EventLoopError("event_loop = uvloop, but uvloop is not installed") from exc
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory


def run(main: Coroutine[Any, Any, T], choice: str) -> T:
    """Run ``main`` to completion on a new loop of the chosen kind (like asyncio.run)."""
    try:
        factory = loop_factory(choice)
    except EventLoopError:
        main.close()  # never started: close it, or Python warns it was never awaited
        raise
    log.info("event loop: %s", "uvloop" if factory is not None else "asyncio")
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main)
