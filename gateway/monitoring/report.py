"""The drift report of a version (what the JSON endpoint answers, the CLI prints and the
metrics export): every feature's live statistics and bins, its reference, its scores, a
summary, and comparisons with related versions (canary vs stable, shadow vs primary)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from gateway.models.served import ServedModel, VersionState
from gateway.models.shadow import ShadowStats
from gateway.monitoring.divergence import scores
from gateway.monitoring.monitor import Monitor, VersionStats
from gateway.monitoring.verdict import BANDS, MIN_VALUES, verdict
from gateway.monitoring.windows import WINDOWS, WindowView

METHODS: Final = ("psi", "js", "ks")

Entry = dict[str, Any]
Models = Callable[[], Sequence[ServedModel]]
ShadowFigures = Callable[[], Mapping[tuple[str, int, int], ShadowStats]]


class UnknownWindow(ValueError):
    """A window name that is not one of WINDOWS."""


def live_features(state: VersionStats, view: WindowView) -> list[Entry]:
    """Every feature's bins and live figures in ``view`` (raw sums too, so reports from
    several workers merge exactly)."""
    entries: list[Entry] = []
    for index, ((role, tensor), tracker) in enumerate(state.trackers.items()):
        stats = view.stats[index]
        for i, feature in enumerate(tracker.numeric):
            n = float(stats.count[i])
            entries.append({
                "name": feature.name, "tensor": tensor, "role": role, "type": "numeric",
                "position": i, "cuts": list(feature.cuts),
                "live": numeric_live(
                    n, float(stats.total[i]), float(stats.squares[i]),
                    low=float(stats.low[i]), high=float(stats.high[i]),
                    nan=float(stats.nan[i]), inf=float(stats.inf[i]),
                    counts=[float(c) for c in stats.hist[i, : int(tracker.bins[i])]]),
            })
        for j, categorical in enumerate(tracker.categorical):
            entries.append({
                "name": categorical.name, "tensor": tensor, "role": role,
                "type": "categorical", "position": j,
                "categories": list(categorical.categories),
                "live": categorical_live([float(c) for c in stats.categories[j]]),
            })
    return entries


def numeric_live(n: float, total: float, squares: float, *, low: float, high: float,
                 nan: float, inf: float, counts: list[float]) -> Entry:
    mean = total / n if n else None
    std = math.sqrt(max(squares / n - (total / n) ** 2, 0.0)) if n else None
    return {"count": n, "sum": total, "sum_squares": squares, "mean": mean, "std": std,
            "min": low if n else None, "max": high if n else None, "nan": nan, "inf": inf,
            "counts": counts}


def categorical_live(counts: list[float]) -> Entry:
    n = sum(counts)
    return {"count": n, "counts": counts, "unseen_share": counts[-1] / n if n else None}


def _profile_reference(state: VersionStats) -> dict[tuple[str, str], Entry]:
    found: dict[tuple[str, str], Entry] = {}
    for (role, _), tracker in state.trackers.items():
        for feature in tracker.numeric:
            ref = feature.reference
            if ref is not None:
                found[(role, feature.name)] = {
                    "count": ref.count, "mean": ref.mean, "std": ref.std, "min": ref.min,
                    "max": ref.max, "nan": ref.nan, "inf": ref.inf, "counts": list(ref.counts)}
        for categorical in tracker.categorical:
            if categorical.counts is not None:
                found[(role, categorical.name)] = {"count": categorical.reference_count,
                                                   "counts": list(categorical.counts)}
    return found


def _same_bins(a: Entry, b: Entry) -> bool:
    return a["type"] == b["type"] and a.get("cuts") == b.get("cuts") and a.get(
        "categories") == b.get("categories")


def _as_reference(entry: Entry) -> Entry:
    live = entry["live"]
    return {k: live[k] for k in ("count", "mean", "std", "min", "max", "nan", "inf", "counts")
            if k in live}


def score(entry: Entry) -> Entry:
    """Fill in psi/js/ks when the entry has a reference and enough live values."""
    ref = entry.get("reference")
    live = entry["live"]
    if ref is None or not ref.get("count") or live["count"] < MIN_VALUES:
        entry.update({m: None for m in METHODS})
    else:
        entry.update(scores(ref["counts"], live["counts"]))
    return entry


def banded(entries: list[Entry], reference: str = "reference",
           counts: Callable[[Entry], tuple[list[float], list[float]]] | None = None,
           ) -> list[Entry]:
    """Give every entry its band (verdict.py), the scored ones tested together; an entry
    without a reference gets none."""
    def both(entry: Entry) -> tuple[list[float], list[float]]:
        return list(entry[reference]["counts"]), list(entry["live"]["counts"])

    pick = counts or both
    tested = sum(1 for e in entries if e.get("psi") is not None)
    for entry in entries:
        if counts is None and not (entry.get(reference) or {}).get("count"):
            entry.update(band=None, bound=None, needed=None, p_value=None)
            continue
        ref, live = pick(entry)
        found = verdict(entry.get("psi"), ref, live, tested)
        entry.update(band=found.band, bound=found.bound, needed=found.needed,
                     p_value=found.p_value)
    return entries


def summary(entries: Iterable[Entry]) -> Entry:
    entries = list(entries)
    scored = [e for e in entries if e.get("psi") is not None]
    result: Entry = {"features": 0, "scored": len(scored), "worst": None,
                     "bands": {band: sum(1 for e in entries if e.get("band") == band)
                               for band in BANDS}}
    for method in METHODS:
        values = [float(e[method]) for e in scored]
        result[f"{method}_max"] = max(values) if values else None
        result[f"{method}_mean"] = sum(values) / len(values) if values else None
    if scored:
        result["worst"] = max(scored, key=lambda e: e["psi"])["name"]
    return result


_SEVERITY: Final = {"act": 0, "watch": 1}


def worst_first(entries: list[Entry]) -> list[Entry]:
    """act, then watch, then the rest; within each, highest PSI first, unscored last."""
    return sorted(entries, key=lambda e: (_SEVERITY.get(e.get("band") or "", 2),
                                          e.get("psi") is None, -(e.get("psi") or 0.0)))


def version_report(monitor: Monitor, model: str, number: int, window: str, *,
                   models: Models | None = None,
                   shadow: ShadowFigures | None = None) -> Entry | None:
    """The report of one version over ``window``; None when it has no statistics yet."""
    if window not in WINDOWS:
        raise UnknownWindow(f"window must be one of {', '.join(WINDOWS)}, got '{window}'")
    state = monitor.state(model, number)
    if state is None:
        return None
    with monitor.lock:
        view = state.windows.view(window) if state.windows is not None else None
        entries = live_features(state, view) if view is not None else []
        reference = state.reference
        earlier_entries: list[Entry] = []
        if reference.kind == "version":
            earlier = monitor.previous(model, number)
            if earlier is not None and earlier.windows is not None:
                earlier_entries = live_features(earlier, earlier.windows.view(window))
    if reference.kind == "profile":
        refs = _profile_reference(state)
        for entry in entries:
            entry["reference"] = refs.get((entry["role"], entry["name"]))
    elif reference.kind == "version":
        by_name = {(e["role"], e["name"]): e for e in earlier_entries}
        for entry in entries:
            other = by_name.get((entry["role"], entry["name"]))
            entry["reference"] = (_as_reference(other) if other is not None
                                  and _same_bins(entry, other) else None)
    else:
        for entry in entries:
            entry["reference"] = None
    entries = worst_first(banded([score(e) for e in entries]))
    gate = monitor.gate_of(state.served)
    report: Entry = {
        "model": model, "version": number,
        "window": {"name": window, "start": view.start if view else None,
                   "end": view.end if view else None, "rows": view.rows if view else 0},
        "reference": {"kind": reference.kind, "source": reference.source,
                      "reason": reference.reason or None, "rows": reference.rows,
                      "built_from": reference.built_from or None},
        "samples": {"taken": gate.taken if gate else 0,
                    "dropped_queue_full": gate.dropped_full if gate else 0,
                    "dropped_rate_cap": gate.dropped_rate if gate else 0,
                    "collecting_bins": state.pending_rows if view is None else 0},
        "summary": {**summary(entries), "features": len(entries)},
        "problems": dict(state.problems),
        "tensors": [{"name": t.profile.name, "role": t.profile.role, "kind": t.profile.kind,
                     "layout": t.profile.layout, "probability": t.profile.probability}
                    for t in state.trackers.values()],
        "features": entries,
        "comparisons": [],
    }
    if models is not None:
        report["comparisons"] = comparisons(monitor, model, number, window, models=models,
                                            shadow=shadow)
    return report


def comparison_pairs(model: ServedModel) -> list[tuple[int, int, str]]:
    """(version, other version, relation) for the related versions of a model: canary vs
    stable (labels), shadow vs primary (the stable label, else the highest ready other
    version), and each version of a weighted split vs the heaviest."""
    routing = model.routing
    pairs: list[tuple[int, int, str]] = []
    labels = routing.labels
    if "canary" in labels and "stable" in labels and labels["canary"] != labels["stable"]:
        pairs.append((labels["canary"], labels["stable"], "canary vs stable"))
    if routing.shadow is not None:
        ready = [n for n, v in model.versions.items()
                 if v.state is VersionState.READY and n != routing.shadow]
        primary = labels.get("stable", max(ready, default=None))
        if primary is not None and primary != routing.shadow:
            pairs.append((routing.shadow, primary, "shadow vs primary"))
    if len(routing.weights) > 1:
        heaviest = max(routing.weights, key=lambda vw: vw[1])[0]
        pairs += [(v, heaviest, "weighted split") for v, _ in routing.weights if v != heaviest]
    return pairs


def comparisons(monitor: Monitor, model: str, number: int, window: str, *, models: Models,
                shadow: ShadowFigures | None) -> list[Entry]:
    """This version's output distributions against each related version's, live."""
    served = next((m for m in models() if m.name == model), None)
    if served is None:
        return []
    found: list[Entry] = []
    for version, other, relation in comparison_pairs(served):
        if number not in (version, other):
            continue
        mine, theirs = (version, other) if number == version else (other, version)
        entry: Entry = {"relation": relation, "version": version, "other_version": other,
                        "features": _output_scores(monitor, model, mine, theirs, window)}
        if relation == "shadow vs primary" and shadow is not None:
            figures = shadow().get((model, other, version))
            if figures is not None:
                entry["shadow"] = {
                    "mirrored": figures.mirrored, "agreed": figures.agreed,
                    "disagreed": figures.disagreed, "errors": figures.errors,
                    "skipped": figures.skipped, "max_abs_diff": figures.max_abs_diff,
                }
        found.append(entry)
    return found


def _output_scores(monitor: Monitor, model: str, mine: int, theirs: int,
                   window: str) -> list[Entry]:
    a, b = monitor.state(model, mine), monitor.state(model, theirs)
    if a is None or b is None or a.windows is None or b.windows is None:
        return []
    with monitor.lock:
        left = live_features(a, a.windows.view(window))
        right = {e["name"]: e for e in live_features(b, b.windows.view(window))
                 if e["role"] == "output"}
    result: list[Entry] = []
    for entry in left:
        other = right.get(entry["name"])
        if entry["role"] != "output" or other is None:
            continue
        counts = _aligned(entry, other)
        if counts is None:
            continue
        item: Entry = {"name": entry["name"], "counts": counts[0], "other_counts": counts[1]}
        enough = min(sum(counts[0]), sum(counts[1])) >= MIN_VALUES
        item.update(scores(counts[1], counts[0]) if enough else {m: None for m in METHODS})
        result.append(item)
    return worst_first(banded(result, counts=compared_counts))


def compared_counts(entry: Entry) -> tuple[list[float], list[float]]:
    """A comparison's two sides: the other version's live counts play the reference."""
    return list(entry["other_counts"]), list(entry["counts"])


def _aligned(a: Entry, b: Entry) -> tuple[list[float], list[float]] | None:
    """Both entries' counts over common bins: equal cuts, or categories matched by name."""
    if _same_bins(a, b):
        return list(a["live"]["counts"]), list(b["live"]["counts"])
    if a["type"] != "categorical" or b["type"] != "categorical":
        return None
    names = list(dict.fromkeys([*a["categories"], *b["categories"]]))

    def spread(entry: Entry) -> list[float]:
        counts = dict(zip(entry["categories"], entry["live"]["counts"], strict=False))
        return [counts.get(n, 0.0) for n in names] + [entry["live"]["counts"][-1]]

    return spread(a), spread(b)
