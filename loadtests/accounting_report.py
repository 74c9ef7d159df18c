"""The accounting's figures per level (``Account``) and its one Markdown table: a column per
level, rows for throughput, each thread group's CPU per request, the loop thread's buckets,
their sum and its closure."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from loadtests.stage_profile import OURS, TRANSPORT

CLOSES_WITHIN = 0.10  # what the stages may miss the loop thread's measured time by


@dataclass
class Account:
    """One level's figures. Per request: ``threads`` (CPU µs and thread count per thread
    group, plain window), the loop thread's CPU and run-queue wait and its ``stages`` (µs
    of its CPU per bucket, profiled window). ``closure`` is the sampled busy time over the
    time the loop thread ran or waited to run: 1.0 when the profile accounts for all of it."""

    server: str
    model: str
    kind: str
    concurrency: int
    requests_per_s: float
    profiled_requests_per_s: float
    threads: dict[str, tuple[float, int]]
    loop_cpu_us: float
    loop_waiting_us: float
    loop_sleeps: float  # times the loop thread blocked (then was woken), per request
    stages: dict[str, float]
    stages_sum_us: float
    closure: float
    samples: int
    idle_share: float
    profile_errors: int
    errors: dict[str, int] = field(default_factory=dict)
    hottest: list[tuple[str, float]] = field(default_factory=list)
    # The loop thread's share of busy samples taken in a system call, and the share of its
    # CPU the kernel counted as system time (None: not read); the stages use the latter.
    kernel_sampled: float = 0.0
    kernel_measured: float | None = None

    @property
    def closes(self) -> bool:
        return abs(self.closure - 1.0) <= CLOSES_WITHIN

    @property
    def label(self) -> str:
        return f"{self.server}, {self.model} {self.kind}, c={self.concurrency}"



def _us(value: float) -> str:
    return f"{value:,.1f}"


def _row(name: str, cells: Sequence[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def table(accounts: Sequence[Account], where: dict[str, object]) -> str:
    """Every level side by side; µs are per request (per message on a stream)."""
    lines = [_row("µs per request", [a.label for a in accounts]),
             "|---|" + "---:|" * len(accounts),
             _row("answers/s (plain / profiled window)",
                  [f"{a.requests_per_s:,.0f} / {a.profiled_requests_per_s:,.0f}"
                   for a in accounts])]
    groups = sorted({g for a in accounts for g, (us, _) in a.threads.items() if us >= 0.05},
                    key=lambda g: (g != "event loop", g))
    for group in groups:
        lines.append(_row(f"thread CPU: {group}", [
            f"{_us(a.threads[group][0])} ({a.threads[group][1]})" if group in a.threads
            else "-" for a in accounts]))
    lines.append(_row("threads without CPU", [
        ", ".join(g for g, (us, _) in a.threads.items() if g not in groups) or "-"
        for a in accounts]))
    lines.append(_row("**thread CPU: all threads**",
                      [_us(sum(us for us, _ in a.threads.values())) for a in accounts]))
    for bucket in OURS:
        lines.append(_row(f"loop, ours: {bucket}", [_us(a.stages[bucket]) for a in accounts]))
    lines.append(_row("**loop, ours: sum**",
                      [_us(sum(a.stages[b] for b in OURS)) for a in accounts]))
    for bucket in TRANSPORT:
        lines.append(_row(f"loop, native: {bucket}",
                          [_us(a.stages[bucket]) for a in accounts]))
    lines.append(_row("**loop, native: sum**",
                      [_us(sum(a.stages[b] for b in TRANSPORT)) for a in accounts]))
    lines += [
        _row("**loop: sum of the buckets**", [_us(a.stages_sum_us) for a in accounts]),
        _row("**loop: measured CPU** (profiled window)", [_us(a.loop_cpu_us) for a in accounts]),
        _row("loop: waiting for a core (run queue)", [_us(a.loop_waiting_us) for a in accounts]),
        _row("loop: measured CPU less the buckets' sum",
             [_us(a.loop_cpu_us - a.stages_sum_us) for a in accounts]),
        _row("loop: went to sleep, times per request (plain window)",
             [f"{a.loop_sleeps:.2f}" for a in accounts]),
        _row("loop: in the kernel, share of samples / of CPU (stime)",
             [f"{a.kernel_sampled:.0%} / " + (f"{a.kernel_measured:.0%}"
              if a.kernel_measured is not None else "-") for a in accounts]),
        _row("closure (sampled busy ÷ ran or waited)",
             [f"{a.closure:.1%} {'ok' if a.closes else 'OPEN'}" for a in accounts]),
        _row("loop samples (idle share)",
             [f"{a.samples} ({a.idle_share:.0%})" for a in accounts]),
        _row("errors", [", ".join(f"{k}: {v}" for k, v in a.errors.items()) or "none"
                        for a in accounts]),
    ]
    head = (f"{where.get('cpu_model')}, {where.get('cpus')} cores, commit "
            f"{where.get('commit')}, load average {where.get('load_average')}: "
            f"`{where.get('command')}`")
    hottest = [f"- {a.label}: " + "; ".join(f"{name} {_us(us)}" for name, us in a.hottest[:6])
               for a in accounts if a.hottest]
    return "\n".join([head, "", *lines, "", "Hottest innermost functions of ours (µs):",
                      *hottest])
