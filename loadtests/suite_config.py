"""The targets suite's settings and their command line: durations, levels, worker counts,
drivers, and the planned length of a run (for the progress bar)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from loadtests import h2load
from loadtests.runner import ints

START_S = 2.5  # a gateway start, for the progress bar's plan


@dataclass(frozen=True)
class Config:
    store: Path
    duration_s: float = 5.0
    warmup_s: float = 1.0
    concurrency: tuple[int, ...] = (1, 8, 32)
    target_concurrency: int = 32
    open_fractions: tuple[float, ...] = (0.5, 0.8)
    cnn_rows: int = 16
    cnn_concurrency: tuple[int, ...] = (2, 4, 8)
    workers: tuple[int, ...] = (1,)
    h2load: bool = True
    costs: bool = True
    cost_rounds: int = 1
    ceiling_rows: tuple[int, ...] = (1, 8, 16, 32, 64)
    ceiling_s: float = 2.0
    channels: int = 4  # client connections per worker

    def planned_s(self) -> float:
        level = self.warmup_s + self.duration_s
        drivers = 2 if self.h2load else 1
        serving = START_S + level * (3 * len(self.concurrency) + 2 * len(self.open_fractions)
                                     + len(self.cnn_concurrency) + 1
                                     + ((6 + len(self.cnn_concurrency)) if self.h2load else 0))
        serving += sum(START_S + 2 * level * drivers for w in self.workers if w > 1)
        ceilings = self.ceiling_s * (2 * len(self.ceiling_rows) + 1)
        runs = 1 + 2 * 4 * self.cost_rounds  # baseline, then each variant and a baseline
        costs = runs * (START_S + drivers * level) if self.costs else 0.0
        return serving + ceilings + costs


QUICK = {"duration": 0.5, "warmup": 0.2, "ceiling_seconds": 0.3}
SLOW = {"duration": 5.0, "warmup": 1.0, "ceiling_seconds": 2.0}


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(",") if v.strip())


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m loadtests.benchmark --suite targets",
                                description="The issue's performance targets in one run.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("benchmark-targets"),
                   help="folder for benchmark.md, benchmark.json and benchmark.png")
    p.add_argument("--store", type=Path, help="model store (default: the demo store)")
    p.add_argument("--quick", action="store_true",
                   help="tiny durations (checks the tool, measures nothing worth quoting)")
    p.add_argument("--duration", type=float, help="measured seconds per level (default 5)")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each (default 1)")
    p.add_argument("--concurrency", default="1,8,32", help="closed-loop levels, 1 worker")
    p.add_argument("--target-concurrency", type=int, default=32,
                   help="the level of the no-op, worker and cost comparisons")
    p.add_argument("--open-fractions", default="0.5,0.8",
                   help="open-loop rates as fractions of each model's closed-loop peak")
    p.add_argument("--cnn-rows", type=int, default=16, help="rows per cnn request")
    p.add_argument("--cnn-concurrency", default="2,4,8")
    p.add_argument("--workers", default="1", help="worker counts, e.g. 1,2")
    p.add_argument("--h2load", choices=("auto", "yes", "no"), default="auto",
                   help="also drive with h2load (auto: when installed)")
    p.add_argument("--cost-rounds", type=int, default=1,
                   help="rounds of the variants, each run between two baseline runs")
    p.add_argument("--no-costs", action="store_true",
                   help="skip the quota, tracing and monitoring runs")
    p.add_argument("--ceiling-rows", default="1,8,16,32,64",
                   help="ONNX Runtime batch sizes")
    p.add_argument("--ceiling-seconds", type=float, help="per batch size (default 2)")
    p.add_argument("--channels", type=int, default=4, help="client connections per worker")
    return p


def config_from(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    from gateway.settings import demo_store

    timing = QUICK if args.quick else SLOW
    duration = args.duration if args.duration is not None else timing["duration"]
    warmup = args.warmup if args.warmup is not None else timing["warmup"]
    ceiling = (args.ceiling_seconds if args.ceiling_seconds is not None
               else timing["ceiling_seconds"])
    if not 0 < duration <= 120 or not 0 <= warmup <= 60 or not 0 < ceiling <= 60:
        parser.error("durations must lie in (0, 120] s, warm-up in [0, 60] s")
    use_h2load = args.h2load == "yes" or (args.h2load == "auto" and h2load.binary() is not None)
    if args.h2load == "yes" and h2load.binary() is None:
        parser.error("--h2load yes: h2load is not installed (nghttp2-client)")
    concurrency = tuple(ints(args.concurrency))
    workers = tuple(ints(args.workers))
    if args.target_concurrency not in concurrency or 1 not in concurrency:
        parser.error("--concurrency must include 1 and --target-concurrency")
    if not workers or workers[0] != 1 or any(w < 1 for w in workers):
        parser.error("--workers must start with 1 (e.g. 1 or 1,2)")
    return Config(
        store=args.store or demo_store(), duration_s=duration, warmup_s=warmup,
        concurrency=concurrency, target_concurrency=args.target_concurrency,
        open_fractions=_floats(args.open_fractions), cnn_rows=args.cnn_rows,
        cnn_concurrency=tuple(ints(args.cnn_concurrency)), workers=workers, h2load=use_h2load,
        costs=not args.no_costs, cost_rounds=max(1, args.cost_rounds),
        ceiling_rows=tuple(ints(args.ceiling_rows)), ceiling_s=ceiling,
        channels=max(1, args.channels),
    )


