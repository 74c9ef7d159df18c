"""How often the drift verdict rule (gateway/monitoring/verdict.py) raises watch or act on
data that did not change, and the smallest shift it calls act at a given request rate.

Usage: python -m loadtests.drift_verdicts [--trials 1000] [--features 10] [--reference 1000]

The population is Gaussian, one column per feature. Each trial draws a reference of
``--reference`` rows, bins it as ``modelgate profile`` bins training data (build_profile),
then draws live windows from the same population, counts them with the monitor's own
tracker and bands every feature with the monitor's own rule, all features of the version
tested together. For the detection table feature 0 of a window is shifted by multiples of
its standard deviation; a window's size follows from the request rate: one row per
request, 1 in ``--sample-every`` sampled, over the 5-minute window the metrics export.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from gateway.monitoring.accumulator import TensorTracker
from gateway.monitoring.divergence import psi
from gateway.monitoring.profile import TensorProfile
from gateway.monitoring.reference import DEFAULT_BINS, build_profile
from gateway.monitoring.verdict import FALSE_ALARM, verdict

WINDOW_S = 300.0
SIZES = (20, 50, 100, 200, 500, 1000, 3000)
RATES = (0.1, 0.5, 1.0, 5.0, 50.0)
SHIFTS = tuple(round(0.1 * i, 1) for i in range(1, 31))  # 0.1 .. 3.0 standard deviations
DETECTED = 0.9
ALARMS = ("watch", "act")


@dataclass(frozen=True)
class Setup:
    features: int
    reference: int
    bins: int
    trials: int


def banded(tensor: TensorProfile, tracker: TensorTracker, rows: np.ndarray,
           features: int) -> list[str]:
    """Every feature's band for the live ``rows``."""
    stats = tracker.empty()
    tracker.update(stats, rows)
    found: list[str] = []
    for index, feature in enumerate(tensor.numeric):
        assert feature.reference is not None
        ref = list(feature.reference.counts)
        got = [float(c) for c in stats.hist[index, : len(ref)]]
        found.append(verdict(psi(ref, got), ref, got, features).band)
    return found


def measure(setup: Setup, sizes: Sequence[int], windows: Sequence[int],
            rng: np.random.Generator) -> tuple[dict[int, list[list[str]]],
                                               dict[int, dict[float, list[list[str]]]]]:
    """Per trial: the bands of an undrifted window of each size, and of each detection
    window with feature 0 shifted by each of SHIFTS."""
    null: dict[int, list[list[str]]] = {n: [] for n in sizes}
    shifted: dict[int, dict[float, list[list[str]]]] = {
        n: {s: [] for s in SHIFTS} for n in windows}
    for _ in range(setup.trials):
        reference = rng.normal(size=(setup.reference, setup.features)).astype(np.float32)
        tensor = build_profile({"x": reference}, {}, bins=setup.bins).tensors[0]
        tracker = TensorTracker(tensor)
        for size in sizes:
            rows = rng.normal(size=(size, setup.features)).astype(np.float32)
            null[size].append(banded(tensor, tracker, rows, setup.features))
        for size in windows:
            rows = rng.normal(size=(size, setup.features)).astype(np.float32)
            for shift in SHIFTS:
                moved = rows.copy()
                moved[:, 0] += np.float32(shift)
                shifted[size][shift].append(banded(tensor, tracker, moved, setup.features))
    return null, shifted


def share(trials: list[list[str]], test: Callable[[list[str]], object]) -> float:
    """The share of trials for which ``test`` holds."""
    return float(np.mean([bool(test(t)) for t in trials]))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--trials", type=int, default=1000)
    parser.add_argument("--features", type=int, default=10)
    parser.add_argument("--reference", type=int, default=1000, help="reference rows")
    parser.add_argument("--bins", type=int, default=DEFAULT_BINS)
    parser.add_argument("--sample-every", type=int, default=10)
    parser.add_argument("--max-rows-per-s", type=int, default=1000)
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                        help="live window sizes for the false-alarm table")
    parser.add_argument("--rates", default=",".join(str(r) for r in RATES),
                        help="requests per second for the detection table")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    setup = Setup(args.features, args.reference, args.bins, args.trials)
    rates = [float(r) for r in args.rates.split(",")]
    windows = {rate: max(1, int(rate * WINDOW_S / args.sample_every)) for rate in rates}
    if args.max_rows_per_s:
        windows = {r: min(n, int(args.max_rows_per_s * WINDOW_S)) for r, n in windows.items()}
    sizes = [int(s) for s in args.sizes.split(",")]
    null, shifted = measure(setup, sizes, sorted(set(windows.values())),
                            np.random.default_rng(args.seed))

    print(f"no drift: {setup.features} features N(0, 1), reference {setup.reference} rows, "
          f"{setup.bins} bins, {setup.trials} trials; FALSE_ALARM {FALSE_ALARM} per version "
          "and evaluation")
    print(f"  {'live values':>11}  {'watch/act (version)':>19}  {'act (version)':>13}  "
          f"{'ok (feature)':>12}  {'insufficient (feature)':>22}")
    for size in sizes:
        trials = null[size]
        flat = [b for t in trials for b in t]
        print(f"  {size:>11}  {share(trials, lambda t: set(t) & set(ALARMS)):>19.4f}  "
              f"{share(trials, lambda t: 'act' in t):>13.4f}  "
              f"{flat.count('ok') / len(flat):>12.3f}  "
              f"{flat.count('insufficient') / len(flat):>22.3f}")

    print(f"smallest shift of feature 0 (in its SDs, steps of {SHIFTS[0]}) called act in >= "
          f"{DETECTED:.0%} of {setup.trials} windows; 1-row requests, 1 in "
          f"{args.sample_every} sampled, {WINDOW_S:.0f} s window")
    print(f"  {'requests/s':>10}  {'live values':>11}  {'smallest shift':>14}  "
          f"{'act on feature 0':>16}  {'watch/act elsewhere':>19}")
    for rate in rates:
        size = windows[rate]
        found = next((s for s in SHIFTS
                      if share(shifted[size][s], lambda t: t[0] == "act") >= DETECTED), None)
        if found is None:
            print(f"  {rate:>10g}  {size:>11}  {'> ' + str(SHIFTS[-1]):>14}")
            continue
        trials = shifted[size][found]
        print(f"  {rate:>10g}  {size:>11}  {found:>14.1f}  "
              f"{share(trials, lambda t: t[0] == 'act'):>16.3f}  "
              f"{share(trials, lambda t: set(t[1:]) & set(ALARMS)):>19.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
