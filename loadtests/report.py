"""Writes one targets-suite run: a Markdown report (targets summary, every level with its
percentiles and errors by status code, ceilings, cost runs) and JSON holding every figure."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from loadtests.measurements import Measurements
from loadtests.results import PERCENTILES, LevelResult, format_errors, load_text
from loadtests.targets import Target, format_targets

MARKDOWN, JSON, PNG = "benchmark.md", "benchmark.json", "benchmark.png"


def _cores(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _level_row(r: LevelResult) -> str:
    batch = "-" if r.mean_batch is None else f"{r.mean_batch:.1f}"
    cells = " | ".join(f"{r.latency_ms(p):.2f}" for p in PERCENTILES)
    load = load_text(r) + (f" ({r.label})" if r.label else "")
    return (
        f"| {r.model} | {load} | {r.driver} | {r.workers} | {r.throughput:,.0f} | "
        f"{r.rows_per_s:,.0f} | {cells} | {batch} | {_cores(r.cores(r.server_cpu_s))} | "
        f"{_cores(r.cores(r.client_cpu_s))} | {format_errors(r.errors)} |"
    )


LEVEL_HEADER = (
    "| model | load | client | workers | req/s | rows/s | p50 ms | p90 ms | p99 ms | p99.9 ms "
    "| mean batch | server cores | client cores | errors |\n"
    "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"
)


def format_levels(levels: Sequence[LevelResult]) -> str:
    return "\n".join([LEVEL_HEADER, *(_level_row(r) for r in levels)])


def format_ceilings(m: Measurements) -> str:
    lines = ["| in-process ONNX Runtime | batch rows | rows/s |", "|---|---:|---:|"]
    for model, by_rows in m.ort_rows_per_s.items():
        lines += [f"| {model} | {n} | {v:,.0f} |" for n, v in by_rows.items()]
    lines += ["", "| ONNX Runtime single call | calls | p50 µs | p90 µs | p99 µs | p99.9 µs |",
              "|---|---:|---:|---:|---:|---:|"]
    for model, s in m.ort_latency_us.items():
        lines.append(f"| {model}, 1 row | {s['calls']:,.0f} | {s['p50']:,.1f} | "
                     f"{s['p90']:,.1f} | {s['p99']:,.1f} | {s['p99.9']:,.1f} |")
    return "\n".join(lines)


def format_costs(m: Measurements) -> str:
    lines = ["| # | variant | client | req/s | p50 ms | p99 ms | p99.9 ms | server cores | "
             "errors |", "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for c in m.costs:
        r = c.level
        lines.append(
            f"| {c.position} | {c.variant} | {r.driver} | {r.throughput:,.0f} | "
            f"{r.latency_ms(50):.2f} | {r.latency_ms(99):.2f} | {r.latency_ms(99.9):.2f} | "
            f"{_cores(r.cores(r.server_cpu_s))} | {format_errors(r.errors)} |"
        )
    return "\n".join(lines)


def markdown(m: Measurements, targets: Sequence[Target], command: str) -> str:
    machine = m.machine
    parts = [
        "# modelgate benchmark: performance targets",
        "",
        f"Measured {m.started_at} in {m.wall_s / 60:.1f} min on {machine.get('cpus')} CPUs "
        f"({machine.get('platform')}; Python {machine.get('python')}, onnxruntime "
        f"{machine.get('onnxruntime')}, grpcio {machine.get('grpcio')}); load average at the "
        f"start {machine.get('load_average')}, at the end {machine.get('load_average_end')}.",
        "",
        f"    {command}",
        "",
        "## Targets",
        "",
        format_targets(targets),
        "",
        "## Load levels",
        "",
        "Closed loop: N concurrent requests, each caller sending its next request when the "
        "last one answers. Open loop: a fixed arrival rate, latency counted from each "
        "request's scheduled send time. Server and client cores: CPU time over the level "
        "(warm-up included) per second of it.",
        "",
        format_levels(m.levels),
        "",
        "## Ceilings",
        "",
        format_ceilings(m),
    ]
    if m.costs:
        parts += ["", "## Cost of quotas and tracing", "", m.cost_method, "", format_costs(m)]
    parts += ["", "## Checks and notes", "", *(f"- {line}" for line in [*m.checks, *m.notes])]
    return "\n".join(parts) + "\n"


def as_json(m: Measurements, targets: Sequence[Target], command: str) -> dict[str, object]:
    return {
        "command": command,
        "started_at": m.started_at,
        "wall_s": round(m.wall_s, 1),
        "machine": m.machine,
        "config": m.config,
        "targets": [t.as_json() for t in targets],
        "levels": [r.summary() for r in m.levels],
        "ort_rows_per_s": m.ort_rows_per_s,
        "ort_latency_us": m.ort_latency_us,
        "cost_method": m.cost_method,
        "costs": [{"position": c.position, "variant": c.variant, **c.level.summary()}
                  for c in m.costs],
        "checks": m.checks,
        "notes": m.notes,
    }


def write(m: Measurements, targets: Sequence[Target], folder: Path, command: str) -> list[Path]:
    """benchmark.md, benchmark.json and benchmark.png in ``folder``; returns their paths."""
    from loadtests.plot import plot

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / MARKDOWN, folder / JSON, folder / PNG]
    paths[0].write_text(markdown(m, targets, command), encoding="utf-8")
    paths[1].write_text(json.dumps(as_json(m, targets, command), indent=2) + "\n",
                        encoding="utf-8")
    plot(m, targets, paths[2])
    return paths
