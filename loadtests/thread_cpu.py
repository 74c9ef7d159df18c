"""The CPU time of each thread of a running process, from Linux /proc: per-thread on-CPU and
run-queue time (``schedstat``, nanoseconds; ``stat``'s clock ticks where there is none), and
the kernel's user/system split of it (``stat``)."""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class ThreadTime:
    """One thread's name (its ``comm``) and times so far, in nanoseconds: on a CPU, and
    runnable but waiting for one (0 where the kernel keeps no schedstat); and how often it
    went to sleep of its own accord (each one a wake-up to pay for later)."""

    name: str
    cpu_ns: int
    waiting_ns: int
    sleeps: int = 0
    # The kernel's split of the thread's CPU (``stat``'s utime and stime, in clock ticks
    # turned into ns): coarse, but no sampler's bias is in it.
    user_ns: int = 0
    system_ns: int = 0


def _sleeps(task: Path) -> int:
    for line in (task / "status").read_text().splitlines():
        if line.startswith("voluntary_ctxt_switches:"):
            return int(line.split()[1])
    return 0


def _read_thread(task: Path) -> ThreadTime | None:
    try:
        name = (task / "comm").read_text().strip()
        # Fields after the parenthesised command name; utime and stime are 14 and 15.
        fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        tick_ns = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
        user_ns, system_ns = int(fields[11]) * tick_ns, int(fields[12]) * tick_ns
        try:
            on_cpu, waiting, _ = (task / "schedstat").read_text().split()
            return ThreadTime(name, int(on_cpu), int(waiting), _sleeps(task), user_ns,
                              system_ns)
        except (OSError, ValueError):
            return ThreadTime(name, user_ns + system_ns, 0, _sleeps(task), user_ns, system_ns)
    except (OSError, IndexError, ValueError):
        return None  # the thread ended while it was read


def thread_times(pid: int) -> dict[int, ThreadTime]:
    """Every live thread of ``pid``, by thread id."""
    found: dict[int, ThreadTime] = {}
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            times = _read_thread(task)
            if times is not None:
                found[int(task.name)] = times
    return found


def spent(before: dict[int, ThreadTime], after: dict[int, ThreadTime]) -> dict[int, ThreadTime]:
    """What each thread alive at ``after`` spent since ``before`` (all of it if it started
    in between)."""
    spent_by: dict[int, ThreadTime] = {}
    for tid, now in after.items():
        then = before.get(tid, ThreadTime(now.name, 0, 0))
        spent_by[tid] = ThreadTime(now.name, now.cpu_ns - then.cpu_ns,
                                   now.waiting_ns - then.waiting_ns, now.sleeps - then.sleeps,
                                   now.user_ns - then.user_ns, now.system_ns - then.system_ns)
    return spent_by


_NUMBERED = re.compile(r"[-_ ]?\d+$")


def group_name(name: str) -> str:
    """A thread's name without a trailing number, so a pool's threads count together."""
    return _NUMBERED.sub("", name) or name


def by_group(times: dict[int, ThreadTime], names: dict[int, str] | None = None
             ) -> dict[str, tuple[int, int]]:
    """CPU nanoseconds and thread count per thread group; ``names`` (e.g. Python's thread
    names from a profile, by thread id) override the kernel's ``comm``."""
    groups: dict[str, tuple[int, int]] = {}
    for tid, time in times.items():
        group = group_name((names or {}).get(tid, time.name))
        cpu, count = groups.get(group, (0, 0))
        groups[group] = (cpu + time.cpu_ns, count + 1)
    return groups
