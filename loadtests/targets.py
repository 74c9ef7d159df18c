"""The issue's performance targets, judged from one run's measurements: each target's
figure, its limit, whether it was met, and how the figure was computed."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

from loadtests.measurements import BASELINE, NOOP, Measurements

FRONT_END = "digits"  # the overhead-bound model: an MLP of ~300k parameters on 64 features
UNBATCHED = "digits_unbatched"  # the same ONNX file without a batcher (no queue delay)
COMPUTE = "cnn"  # the compute-bound model: a small CNN on 3x32x32


@dataclass(frozen=True)
class Target:
    """One line of the summary; ``limit`` None marks a figure reported for context only."""

    name: str
    measured: float | None
    unit: str
    limit: float | None
    at_least: bool  # the figure must be >= limit (else <=)
    detail: str
    short: str = ""  # the name on the plot

    @property
    def met(self) -> bool | None:
        if self.limit is None or self.measured is None:
            return None
        return self.measured >= self.limit if self.at_least else self.measured <= self.limit

    def as_json(self) -> dict[str, object]:
        return {**asdict(self), "met": self.met}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ceiling_targets(m: Measurements, concurrency: int) -> list[Target]:
    found: list[Target] = []
    for workers in m.workers():
        for driver in m.drivers():
            gateway = m.level(FRONT_END, concurrency, driver=driver, workers=workers)
            noop = m.level(NOOP, concurrency, driver=driver, workers=workers)
            if gateway is None or noop is None:
                continue
            ratio = 100 * gateway.throughput / noop.throughput if noop.throughput else None
            found.append(Target(
                f"{FRONT_END} at {concurrency} concurrent requests vs the no-op server, "
                f"{workers} worker{'s' if workers > 1 else ''}, {driver} client",
                ratio, "%", 70.0, True,
                f"{gateway.throughput:,.0f} / {noop.throughput:,.0f} req/s",
                f"vs no-op, {workers}w, {driver}",
            ))
    return found


def _compute_target(m: Measurements) -> list[Target]:
    ceiling = m.ort_rows_per_s.get(COMPUTE)
    if not ceiling:
        return []
    rows, top = max(ceiling.items(), key=lambda kv: kv[1])
    found: list[Target] = []
    for driver in m.drivers():
        best = m.best_rows_per_s(COMPUTE, driver=driver)
        if best is None:
            continue
        found.append(Target(
            f"{COMPUTE} rows/s vs in-process ONNX Runtime's best, {driver} client",
            100 * best.rows_per_s / top if top else None, "%", 80.0, True,
            f"{best.rows_per_s:,.0f} rows/s ({int(best.load)} concurrent, "
            f"{best.rows_per_request} rows a request) / {top:,.0f} rows/s (batches of {rows})",
            f"{COMPUTE} vs ORT, {driver}",
        ))
    return found


def _latency_targets(m: Measurements) -> list[Target]:
    ort = m.ort_latency_us.get(FRONT_END, {}).get("p50")
    if ort is None:
        return []
    found: list[Target] = []
    for driver in m.drivers():
        unbatched = m.level(UNBATCHED, 1, driver=driver)
        if unbatched is None:
            continue
        batched, noop = m.level(FRONT_END, 1, driver=driver), m.level(NOOP, 1, driver=driver)
        p50 = unbatched.latency_ms(50) * 1000
        found.append(Target(
            f"concurrency 1: {UNBATCHED} p50 - ONNX Runtime call p50, {driver} client",
            p50 - ort, "µs", 250.0, False, f"{p50:,.0f} - {ort:,.0f} µs",
            f"c=1 over ORT, {driver}",
        ))
        if noop is not None:
            n50 = noop.latency_ms(50) * 1000
            found.append(Target(
                f"concurrency 1: {UNBATCHED} p50 - no-op p50 - ORT p50 (what the gateway adds "
                f"to the transport), {driver} client",
                p50 - n50 - ort, "µs", None, False, f"{p50:,.0f} - {n50:,.0f} - {ort:,.0f} µs",
            ))
            found.append(Target(
                f"concurrency 1: the no-op server's p50 (the transport floor), {driver} client",
                n50, "µs", None, False, "no model, no parsing: what any call costs here",
            ))
        if batched is not None:
            b50 = batched.latency_ms(50) * 1000
            found.append(Target(
                f"concurrency 1: {FRONT_END} (batched: its queue delay waits by design) p50 "
                f"- ORT p50, {driver} client", b50 - ort, "µs", None, False,
                f"{b50:,.0f} - {ort:,.0f} µs",
            ))
    return found


def _cost_targets(m: Measurements) -> list[Target]:
    found: list[Target] = []
    drivers = sorted({c.level.driver for c in m.costs}, key=lambda d: d != "python")
    for driver in drivers:
        base = _mean(m.cost_throughput(BASELINE, driver))
        for variant in m.cost_variants():
            ratios = m.cost_ratios(variant, driver)
            mean, ratio = _mean(m.cost_throughput(variant, driver)), _mean(ratios)
            if base is None or mean is None or ratio is None:
                continue
            # Drift monitoring is on by default: its budget is 5 %, the opt-ins' 10 %.
            floor = 95.0 if variant.startswith("monitoring") else 90.0
            found.append(Target(
                f"{variant}: throughput vs none, {driver} client", 100 * ratio, "%", floor,
                True, f"{mean:,.0f} req/s vs {base:,.0f} (means; each run against the "
                f"baselines either side, {len(ratios)} run{'s' if len(ratios) > 1 else ''})",
                f"{variant}, {driver}",
            ))
    return found


def evaluate(m: Measurements, concurrency: int = 32) -> list[Target]:
    """Every target the measurements allow judging, in the issue's order."""
    return [*_ceiling_targets(m, concurrency), *_compute_target(m), *_latency_targets(m),
            *_cost_targets(m)]


def _figure(t: Target) -> str:
    if t.measured is None:
        return "-"
    return f"{t.measured:.1f} %" if t.unit == "%" else f"{t.measured:,.0f} {t.unit}"


def format_targets(targets: Sequence[Target]) -> str:
    """The summary: each target, its figure, its limit and whether it was met."""
    lines = ["| target | measured | required | met | from |", "|---|---:|---:|---|---|"]
    for t in targets:
        if t.limit is None:
            required, met = "(context)", ""
        else:
            sign = "≥" if t.at_least else "≤"
            number = f"{t.limit:g} %" if t.unit == "%" else f"{t.limit:g} {t.unit}"
            required, met = f"{sign} {number}", "yes" if t.met else "**no**"
        lines.append(f"| {t.name} | {_figure(t)} | {required} | {met} | {t.detail} |")
    return "\n".join(lines)
