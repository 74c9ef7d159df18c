"""What the in-process hot-path tools (loadtests.hotpath, loadtests.http_hotpath) share: rounds
of closed-loop callers timed by the event loop thread's CPU and the wall clock, and their CLI."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import pstats
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.process import event_loop


@dataclasses.dataclass
class Round:
    """One round: the requests answered, the loop thread's CPU and wall seconds they took and,
    where the tool counts them, the batches the server ran."""

    requests: int
    cpu_s: float
    wall_s: float
    batches: int | None = None

    def line(self, name: str, concurrency: int) -> str:
        text = (f"{name}, {concurrency} callers: "
                f"{1e6 * self.cpu_s / self.requests:.1f} µs of loop CPU a request, "
                f"{1e6 * self.wall_s / self.requests:.1f} µs wall")
        if self.batches is not None:
            text += f", mean batch {self.requests / max(1, self.batches):.1f}"
        return text


async def timed_round(caller: Callable[[int], Awaitable[None]], *, concurrency: int,
                      requests: int, profile: cProfile.Profile | None) -> Round:
    """``concurrency`` callers at once, each making its share of ``requests`` (the remainder
    is not made), profiled when ``profile`` is given."""
    cpu, wall = time.thread_time(), time.perf_counter()
    if profile is not None:
        profile.enable()
    await asyncio.gather(*(caller(requests // concurrency) for _ in range(concurrency)))
    if profile is not None:
        profile.disable()
    done = requests // concurrency * concurrency
    return Round(done, time.thread_time() - cpu, time.perf_counter() - wall)


def parser(prog: str, description: str | None, *, model_help: str | None,
           concurrency: int, requests: int) -> argparse.ArgumentParser:
    """The options both tools take; each adds its own after these."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, default=None, help="default: the demo store")
    parser.add_argument("--model", default="digits", help=model_help)
    parser.add_argument("--concurrency", type=int, default=concurrency)
    parser.add_argument("--requests", type=int, default=requests)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tenants", type=Path, help="a tenants file (then --key is sent)")
    parser.add_argument("--key", help="the API key to send")
    parser.add_argument("--event-loop", default="auto", choices=event_loop.CHOICES)
    parser.add_argument("--monitoring", action=argparse.BooleanOptionalAction, default=True,
                        help="drift monitoring at its default sampling (on, as served)")
    parser.add_argument("--profile", type=int, metavar="N", default=0,
                        help="print the N functions with the most own time (cProfile)")
    return parser


def print_profile(profile: cProfile.Profile | None, top: int) -> None:
    """The ``top`` functions with the most own time, if a profile was taken."""
    if profile is None:
        return
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    print(out.getvalue())
