"""The targets suite's figure (matplotlib, Agg, PNG): throughput per level against the no-op
and ONNX Runtime ceilings, latency percentiles, the targets, and the cost runs in order."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only: no display on a benchmark machine

import matplotlib.pyplot as plt

from loadtests.measurements import BASELINE, NOOP, NOOP_CNN, Measurements
from loadtests.results import PERCENTILES
from loadtests.targets import COMPUTE, FRONT_END, UNBATCHED, Target

COLORS = {FRONT_END: "tab:blue", UNBATCHED: "tab:orange", NOOP: "tab:gray",
          COMPUTE: "tab:green"}


def _throughput(ax: Any, m: Measurements) -> None:
    models = (FRONT_END, UNBATCHED, NOOP)
    closed = [r for r in m.levels if r.mode == "closed" and r.workers == 1 and r.model in models]
    groups = sorted({(r.driver != "python", r.driver, int(r.load)) for r in closed})
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        heights = []
        for _, driver, load in groups:
            level = m.level(model, load, driver=driver)
            heights.append(level.throughput if level else 0.0)
        ax.bar([g + (i - 1) * width for g in range(len(groups))], heights, width,
               label=model, color=COLORS[model])
    ax.set_xticks(range(len(groups)), [f"{load}\n{driver}" for _, driver, load in groups])
    ax.set_xlabel("concurrent requests, client")
    ax.set_ylabel("requests/s")
    ax.set_title("Throughput, 1 worker: gateway vs the no-op gRPC server")
    ax.legend(fontsize=8)


def _latency(ax: Any, m: Measurements) -> None:
    levels = [r for r in m.levels if r.driver == "python" and r.workers == 1 and r.requests]
    for x, r in enumerate(levels):
        values = [r.latency_ms(p) for p in PERCENTILES]
        color = COLORS.get(r.model, "tab:purple")
        ax.plot([x] * len(values), values, color=color, linewidth=1)
        for value, marker in zip(values, ("o", "s", "^", "v"), strict=True):
            ax.plot(x, value, marker, color=color, markersize=4)
    ax.set_xticks(range(len(levels)),
                  [f"{r.model.replace('_unbatched', '_u')} "
                   f"{int(r.load) if r.mode == 'closed' else f'{r.load:,.0f}/s'}"
                   for r in levels], rotation=70, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms (log)")
    ax.set_title("Latency per level: p50 ○  p90 □  p99 △  p99.9 ▽ (Python client)")


def _compute(ax: Any, m: Measurements) -> None:
    ceiling = m.ort_rows_per_s.get(COMPUTE, {})
    gateway = [r for r in m.levels if r.model == COMPUTE and r.mode == "closed"]
    noop = [r for r in m.levels if r.model == NOOP_CNN]
    labels = ([f"ORT\n{n} rows" for n in ceiling]
              + [f"gateway\n{int(r.load)} conc" for r in gateway]
              + [f"no-op\n{int(r.load)} conc" for r in noop])
    heights = ([*ceiling.values()] + [r.rows_per_s for r in gateway]
               + [r.rows_per_s for r in noop])
    colors = (["tab:red"] * len(ceiling) + [COLORS[COMPUTE]] * len(gateway)
              + [COLORS[NOOP]] * len(noop))
    ax.bar(range(len(heights)), heights, color=colors)
    if ceiling:
        best = max(ceiling.values())
        ax.axhline(0.8 * best, color="black", linestyle="--", linewidth=1)
        ax.text(0, 0.8 * best, " 80 % of ORT's best", va="bottom", fontsize=8)
    ax.set_xticks(range(len(heights)), labels, fontsize=8)
    ax.set_ylabel("rows/s")
    rows = gateway[0].rows_per_request if gateway else 0
    ax.set_title(f"{COMPUTE} rows/s: gateway ({rows} rows a request) vs in-process ONNX "
                 "Runtime\n(and the no-op server fed the same requests)")


def _targets(ax: Any, targets: Sequence[Target]) -> None:
    shown = [t for t in targets if t.unit == "%" and t.limit is not None and t.measured]
    for y, t in enumerate(shown):
        ax.barh(y, t.measured, color="tab:green" if t.met else "tab:red")
        ax.plot([t.limit, t.limit], [y - 0.4, y + 0.4], color="black", linewidth=2)
        ax.text(t.measured, y, f" {t.measured:.0f} %", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)), [t.short or t.name for t in shown], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("% of the reference (black bar: the target)")
    ax.set_title("Throughput targets")


def _concurrency_one(ax: Any, m: Measurements) -> None:
    ort = m.ort_latency_us.get(FRONT_END, {}).get("p50")
    bars: list[tuple[str, float, str]] = []
    if ort is not None:
        bars.append(("ORT call", ort, "tab:red"))
    for name, color in ((NOOP, COLORS[NOOP]), (UNBATCHED, COLORS[UNBATCHED]),
                        (FRONT_END, COLORS[FRONT_END])):
        level = m.level(name, 1)
        if level is not None:
            bars.append((name, level.latency_ms(50) * 1000, color))
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    if ort is not None:
        ax.axhline(ort + 250, color="black", linestyle="--", linewidth=1)
        ax.text(-0.4, ort + 250, "ORT p50 + 250 µs", va="bottom", fontsize=8)
    ax.set_ylabel("p50 µs")
    ax.set_title("Concurrency 1: median latency (Python client)")


def _costs(ax: Any, m: Measurements) -> None:
    variants = [BASELINE, *m.cost_variants()]
    palette = ["tab:gray", "tab:blue", "tab:orange", "tab:purple", "tab:green"]
    for driver, marker in (("python", "o"), ("h2load", "s")):
        for variant, color in zip(variants, palette, strict=False):
            runs = [c for c in m.costs if c.variant == variant and c.level.driver == driver]
            if runs:
                ax.plot([c.position for c in runs], [c.level.throughput for c in runs],
                        marker, color=color, label=f"{variant} ({driver})")
    ax.set_xlabel("position in the interleaved sequence")
    ax.set_ylabel("requests/s")
    ax.set_title(f"Cost runs: {FRONT_END}, in the order measured")
    if m.costs:
        ax.legend(fontsize=7, ncol=2, loc="upper center", bbox_to_anchor=(0.5, -0.12))


def plot(m: Measurements, targets: Sequence[Target], path: Path) -> None:
    """Six panels in one PNG at ``path``."""
    fig, axes = plt.subplots(3, 2, figsize=(15, 15))
    _throughput(axes[0][0], m)
    _latency(axes[0][1], m)
    _compute(axes[1][0], m)
    _concurrency_one(axes[1][1], m)
    _targets(axes[2][0], targets)
    _costs(axes[2][1], m)
    fig.suptitle(f"modelgate performance targets, {m.started_at}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
