"""Everything one run of the targets suite measured: load levels, ONNX Runtime ceilings and
single-call latency, the interleaved cost runs, correctness checks and notes."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from loadtests.drivers import percentile
from loadtests.results import LevelResult

NOOP = "no-op server"
NOOP_CNN = "no-op server, cnn request"  # the same server fed the compute model's request
BASELINE = "baseline"


@dataclass
class CostRun:
    """One gateway start of the cost sequence: a variant (or the baseline) at one position,
    measured with one driver."""

    variant: str
    position: int
    level: LevelResult


@dataclass
class Measurements:
    config: dict[str, object]
    machine: dict[str, object]
    levels: list[LevelResult] = field(default_factory=list)
    ort_rows_per_s: dict[str, dict[int, float]] = field(default_factory=dict)
    ort_latency_us: dict[str, dict[str, float]] = field(default_factory=dict)
    costs: list[CostRun] = field(default_factory=list)
    cost_method: str = ""
    checks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    wall_s: float = 0.0

    def level(
        self, model: str, load: float, *, driver: str = "python", workers: int = 1,
        mode: str = "closed",
    ) -> LevelResult | None:
        """The measured level of that model, load, driver and worker count, if any."""
        for r in self.levels:
            if (r.model, r.mode, r.load, r.driver, r.workers) == (model, mode, load, driver,
                                                                   workers):
                return r
        return None

    def best_rows_per_s(self, model: str, *, driver: str = "python") -> LevelResult | None:
        """The closed-loop level of ``model`` with the most rows per second."""
        found = [r for r in self.levels
                 if r.model == model and r.mode == "closed" and r.driver == driver]
        return max(found, key=lambda r: r.rows_per_s, default=None)

    def cost_throughput(self, variant: str, driver: str) -> list[float]:
        return [c.level.throughput for c in self.costs
                if c.variant == variant and c.level.driver == driver]

    def cost_ratios(self, variant: str, driver: str) -> list[float]:
        """Each run of ``variant`` over the mean of the baseline runs right before and after
        it (same driver): drift slower than one run's length cancels out."""
        by_position = {(c.position, c.variant): c.level.throughput for c in self.costs
                       if c.level.driver == driver}
        ratios = []
        for (position, name), throughput in sorted(by_position.items()):
            if name != variant:
                continue
            around = [by_position[(p, BASELINE)] for p in (position - 1, position + 1)
                      if (p, BASELINE) in by_position]
            if around and sum(around) > 0:
                ratios.append(throughput / (sum(around) / len(around)))
        return ratios

    def cost_variants(self) -> list[str]:
        seen: list[str] = []
        for c in self.costs:
            if c.variant != BASELINE and c.variant not in seen:
                seen.append(c.variant)
        return seen

    def drivers(self) -> list[str]:
        return sorted({r.driver for r in self.levels}, key=lambda d: d != "python")

    def workers(self) -> list[int]:
        return sorted({r.workers for r in self.levels})


def latency_summary(latencies_s: Iterable[float]) -> dict[str, float]:
    """p50/p90/p99/p99.9 and the count of per-call latencies, in microseconds."""
    values = list(latencies_s)
    summary = {f"p{p:g}": round(percentile(values, p) * 1e6, 1) for p in (50, 90, 99, 99.9)}
    summary["calls"] = float(len(values))
    return summary
