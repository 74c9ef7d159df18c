"""The Triton side-by-side's figures and report: what one level measured, the targets judged
from the figures, and versus.md, versus.json and versus.png (matplotlib, Agg) in one folder."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a benchmark machine

import matplotlib.pyplot as plt

MODELGATE, MODELGATE_2 = "modelgate", "modelgate, 2 workers"
TRITON, FORWARD = "Triton", "modelgate -> Triton"
NOOP, NOOP_2 = "no-op grpc.aio", "no-op grpc.aio, 2 processes"


@dataclass
class Figure:
    """One measured level: a server, a model, unary or stream, at a concurrency."""

    server: str
    model: str
    kind: str  # "unary" or "stream"
    concurrency: int  # connections x streams (h2load's -c x -m)
    messages_per_s: float
    mean_ms: float
    p50_ms: float
    cpu_us_per_message: float | None = None  # the server's own CPU counters
    errors: dict[str, int] = field(default_factory=dict)


HEADER = ("| server | model | call | concurrent | messages/s | mean ms | p50 ms "
          "| server CPU µs/message | errors |\n|---|---|---|---:|---:|---:|---:|---:|---|")


def row(f: Figure) -> str:
    cpu = f"{f.cpu_us_per_message:.0f}" if f.cpu_us_per_message is not None else ""
    latency = (f"{f.mean_ms:.3f} | {f.p50_ms:.3f}" if f.kind == "unary"
               else f"{f.mean_ms:.2f}* | {f.p50_ms:.2f}*")
    return (f"| {f.server} | {f.model} | {f.kind} | {f.concurrency} | {f.messages_per_s:,.0f} "
            f"| {latency} | {cpu} | {f.errors or ''} |")




@dataclass(frozen=True)
class Verdict:
    target: str
    measured: str
    met: bool | None  # None: a figure it needs is missing


def _find(figures: Sequence[Figure], server: str, model: str, kind: str,
          concurrency: int) -> Figure | None:
    for f in figures:
        if (f.server, f.model, f.kind, f.concurrency) == (server, model, kind, concurrency):
            return f
    return None


def _ratio(a: Figure | None, b: Figure | None) -> float | None:
    if a is None or b is None or not b.messages_per_s:
        return None
    return a.messages_per_s / b.messages_per_s


def _as_fast(ours: Figure, theirs: Figure) -> tuple[str, bool]:
    return (f"mean {ours.mean_ms * 1000:.0f} vs {theirs.mean_ms * 1000:.0f} µs, "
            f"p50 {ours.p50_ms * 1000:.0f} vs {theirs.p50_ms * 1000:.0f} µs",
            ours.mean_ms <= theirs.mean_ms and ours.p50_ms <= theirs.p50_ms)


def _forwarding_adds(through: Figure, direct: Figure) -> tuple[str, bool]:
    added = (through.mean_ms - direct.mean_ms) * 1000
    added50 = (through.p50_ms - direct.p50_ms) * 1000
    return f"mean +{added:.0f} µs, p50 +{added50:.0f} µs", added <= 300


def _compared(figures: Sequence[Figure], model: str, servers: tuple[str, str], target: str,
              judge: Callable[[Figure, Figure], tuple[str, bool]]) -> Verdict:
    """The two servers' unary figures for ``model`` at concurrency 1 judged (what was measured,
    whether the target is met), or "not measured" where either is missing."""
    first, second = (_find(figures, s, model, "unary", 1) for s in servers)
    if first is None or second is None:
        return Verdict(target, "not measured", None)
    return Verdict(target, *judge(first, second))


def verdicts(figures: Sequence[Figure], concurrency: int = 32) -> list[Verdict]:
    out: list[Verdict] = []
    stream = {s: _find(figures, s, "mlp", "stream", concurrency)
              for s in (MODELGATE, TRITON, NOOP)}
    vs_triton = _ratio(stream[MODELGATE], stream[TRITON])
    vs_noop = _ratio(stream[MODELGATE], stream[NOOP])
    out.append(Verdict("streaming, batched MLP: >= 1.5x Triton's streaming messages/s",
                       f"{vs_triton:.2f}x" if vs_triton is not None else "not measured",
                       None if vs_triton is None else vs_triton >= 1.5))
    out.append(Verdict("streaming, batched MLP: >= 60 % of the no-op bidi server",
                       f"{vs_noop:.0%}" if vs_noop is not None else "not measured",
                       None if vs_noop is None else vs_noop >= 0.6))
    for model in ("mlp", "cnn"):
        out.append(_compared(figures, model, (MODELGATE, TRITON),
                             f"concurrency 1, {model}: mean and p50 <= Triton's", _as_fast))
    two = _ratio(_find(figures, MODELGATE_2, "mlp", "unary", concurrency),
                 _find(figures, TRITON, "mlp", "unary", concurrency))
    ceiling = _ratio(_find(figures, NOOP_2, "mlp", "unary", concurrency),
                     _find(figures, TRITON, "mlp", "unary", concurrency))
    out.append(Verdict(
        f"unary, concurrency {concurrency}, batched MLP, 2 workers: >= 0.6x Triton",
        (f"{two:.2f}x" if two is not None else "not measured")
        + (f" (no-op server, 2 processes: {ceiling:.2f}x)" if ceiling is not None else ""),
        None if two is None else two >= 0.6))
    for model in ("mlp", "cnn"):
        out.append(_compared(figures, model, (FORWARD, TRITON),
                             f"through the gateway to Triton, c=1, {model}: <= 300 µs added",
                             _forwarding_adds))
    fwd = _find(figures, FORWARD, "mlp", "unary", concurrency)
    own = _find(figures, MODELGATE, "mlp", "unary", concurrency)
    if fwd is None or own is None or fwd.cpu_us_per_message is None or \
            own.cpu_us_per_message is None:
        out.append(Verdict("forwarding CPU per request <= in-process", "not measured", None))
    else:
        out.append(Verdict(
            f"forwarding, c={concurrency}: gateway CPU per request <= in-process (MLP)",
            f"{fwd.cpu_us_per_message:.0f} vs {own.cpu_us_per_message:.0f} µs",
            fwd.cpu_us_per_message <= own.cpu_us_per_message))
    return out


def markdown(figures: Sequence[Figure], machine: dict[str, object]) -> str:
    judged = verdicts(figures)
    lines = ["# modelgate and Triton, side by side", "",
             f"Command: `{machine.get('command', '?')}`  ",
             f"Machine: {machine.get('cpu_model', '?')}, {machine.get('cpus')} cores; "
             f"{machine.get('platform')}; commit {machine.get('commit', '?')}; "
             f"load average at the start {machine.get('load_average')}", "",
             "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for v in judged:
        met = "not measured" if v.met is None else ("yes" if v.met else "no")
        lines.append(f"| {v.target} | {v.measured} | {met} |")
    notes = machine.get("notes")
    if isinstance(notes, list) and notes:
        lines += ["", "Notes:", *(f"- {n}" for n in notes)]
    lines += ["", "## Figures", "", HEADER, *(row(f) for f in figures), "",
              "h2load is the client throughout (one thread). A unary level is `-c 4 -m 8` "
              "(concurrency 32) or `-c 1 -m 1`; a stream level posts a body of several gRPC "
              "frames to ModelStreamInfer, so each h2load request is one stream carrying "
              "that many messages, all in flight at once. *Stream latencies are per stream "
              "(every message answered), not per message. Server CPU counts the server's "
              "processes (for Triton: tritonserver and its Python-backend stubs) over the "
              "warm-up and the measurement, per message sent in them."]
    return "\n".join(lines) + "\n"


def plot(figures: Sequence[Figure], path: Path) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    rated = [f for f in figures if f.concurrency > 1]
    names = [f"{f.server}\n{f.model} {f.kind}" for f in rated]
    colors = ["tab:blue" if f.server.startswith("modelgate") else
              "tab:gray" if f.server.startswith("no-op") else "tab:green" for f in rated]
    left.barh(range(len(rated)), [f.messages_per_s for f in rated], color=colors)
    left.set_yticks(range(len(rated)), names, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("messages/s (32 concurrent: 4 connections x 8 streams)")
    left.set_title("Throughput")
    single = [f for f in figures if f.concurrency == 1]
    labels = [f"{f.server}\n{f.model}" for f in single]
    x = range(len(single))
    right.bar([i - 0.2 for i in x], [f.mean_ms * 1000 for f in single], 0.4, label="mean")
    right.bar([i + 0.2 for i in x], [f.p50_ms * 1000 for f in single], 0.4, label="p50")
    right.set_xticks(list(x), labels, fontsize=7, rotation=30)
    right.set_ylabel("µs")
    right.set_title("Latency at concurrency 1 (unary)")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(out: Path, figures: Sequence[Figure], machine: dict[str, object]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "versus.md").write_text(markdown(figures, machine), encoding="utf-8")
    data = {"machine": machine, "figures": [asdict(f) for f in figures],
            "targets": [asdict(v) for v in verdicts(figures)]}
    (out / "versus.json").write_text(
        json.dumps(data, indent=2, default=lambda v: None if isinstance(v, float)
                   and math.isnan(v) else str(v)), encoding="utf-8")
    plot(figures, out / "versus.png")
