"""``GET /v2/models/{model}[/versions/{version}]/drift[?window=5m|1h|all]``: the drift
report as JSON, for the metrics port of one process; and the merge of several workers'
reports into one, for the supervisor's metrics port (their histograms add up exactly)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Container, Iterable, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, unquote

from gateway.monitoring.divergence import scores
from gateway.monitoring.monitor import Monitor
from gateway.monitoring.report import (
    METHODS,
    Entry,
    Models,
    ShadowFigures,
    UnknownWindow,
    banded,
    categorical_live,
    compared_counts,
    numeric_live,
    score,
    summary,
    version_report,
    worst_first,
)
from gateway.monitoring.verdict import MIN_VALUES
from gateway.monitoring.windows import DEFAULT_WINDOW, WINDOWS

_PATH: Final = re.compile(r"/v2/models/([^/]{1,256})(?:/versions/([^/]{1,256}))?/drift")
_NUMBER: Final = re.compile(r"[0-9]{1,18}")
JSON_TYPE: Final = "application/json"

Answer = tuple[int, dict[str, Any]]


def drift_path(path: str) -> tuple[str, str | None] | None:
    """(model, version as written or None) when ``path`` (without the query) is a drift
    path; the version may be anything, so that a label gets a clear 400, not a 404."""
    match = _PATH.fullmatch(path)
    if match is None:
        return None
    return unquote(match.group(1)), (unquote(match.group(2)) if match.group(2) else None)


def version_number(text: str) -> int:
    """A drift path's version: a number (labels are for routing requests, not reports)."""
    if _NUMBER.fullmatch(text) is None:
        raise UnknownVersion(f"a drift report names its version by number, got '{text}'")
    return int(text)


class UnknownVersion(ValueError):
    """A drift path's version that is not a number."""


def window_of(query: str) -> str:
    values = parse_qs(query).get("window", [DEFAULT_WINDOW])
    return values[-1]


class DriftEndpoint:
    """Answers drift paths from a monitor (status, JSON body)."""

    def __init__(self, monitor: Monitor, models: Models | None = None,
                 shadow: ShadowFigures | None = None) -> None:
        self._monitor = monitor
        self._models = models
        self._shadow = shadow

    def answer(self, path: str, query: str) -> Answer | None:
        """None when ``path`` is not a drift path; else the status and JSON object."""
        target = drift_path(path)
        if target is None:
            return None
        model, version = target
        try:
            number = version_number(version) if version is not None else None
        except UnknownVersion as exc:
            return 400, {"error": str(exc)}
        return self.report(model, number, window_of(query))

    def report(self, model: str, number: int | None, window: str,
               visible: Container[int] | None = None) -> Answer:
        """The report of one version, or of every monitored version of ``model`` (those in
        ``visible`` when given: a tenant's view, as the REST port answers it). A ready
        version of a monitored model has one from the start (0 samples); 404 says why
        there is none: monitoring off, the model unknown or excluded, the version unknown
        or not ready."""
        if window not in WINDOWS:
            return 400, {"error": f"window must be one of {', '.join(WINDOWS)}, got '{window}'"}
        if not self._monitor.config.enabled:
            return 404, {"error": "drift monitoring is off (setting 'monitoring')"}
        refused = self._unmonitored(model, number)
        if refused is not None:
            return 404, {"error": refused}
        numbers = ([number] if number is not None else
                   [s.number for s in self._monitor.states() if s.model == model
                    and (visible is None or s.number in visible)])
        try:
            reports = [r for n in numbers if (r := version_report(
                self._monitor, model, n, window, models=self._models,
                shadow=self._shadow)) is not None]
        except UnknownWindow as exc:
            return 400, {"error": str(exc)}
        if not reports:
            what = f"model '{model}'" + (f" version {number}" if number is not None else "")
            return 404, {"error": f"no drift statistics for {what}: no version of it is "
                                  "ready or sampled yet"}
        if number is not None:
            return 200, reports[0]
        return 200, {"model": model, "versions": reports}

    def _unmonitored(self, model: str, number: int | None) -> str | None:
        """Why ``model`` (version ``number``) has no report, or None; tracks its ready
        versions so that they have one. Without the served models (a bare monitor),
        only the statistics decide."""
        if self._models is None:
            return None
        served = next((m for m in self._models() if m.name == model), None)
        if served is None:
            return f"unknown model '{model}'"
        if not self._monitor.monitored(model):
            return (f"model '{model}' is not monitored: the setting 'monitoring_exclude' "
                    "names it")
        self._monitor.sync([served])
        if number is None:
            return None
        version = served.versions.get(number)
        if version is None:
            return f"model '{model}' has no version {number}"
        if self._monitor.state(model, number) is None:
            why = f": {version.reason}" if version.reason else ""
            return (f"model '{model}' version {number} is not monitored while it is "
                    f"{version.state.name.lower()}{why}")
        return None


def encode(body: dict[str, Any]) -> bytes:
    """JSON with non-finite floats (an empty feature's min) as null."""
    return json.dumps(_finite(body), sort_keys=True).encode() + b"\n"


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


# ---- several workers -------------------------------------------------------------------


def merge_answers(answers: Sequence[Answer]) -> Answer:
    """One answer from every worker's answer to the same drift path: version reports merged
    feature by feature (counts, sums, min, max added up; scores recomputed on the merged
    histograms); a 404 only when no worker has statistics."""
    found = [body for status, body in answers if status == 200]
    if not found:
        return answers[0] if answers else (503, {"error": "no worker answered"})
    if "versions" in found[0]:
        by_version: dict[int, list[Entry]] = {}
        for body in found:
            for report in body.get("versions", []):
                by_version.setdefault(report["version"], []).append(report)
        return 200, {"model": found[0]["model"],
                     "versions": [merge_reports(r) for _, r in sorted(by_version.items())]}
    return 200, merge_reports(found)


def merge_reports(reports: Sequence[Entry]) -> Entry:
    """One version's reports from several workers merged into one."""
    first = dict(reports[0])
    if len(reports) == 1:
        return first
    features: dict[tuple[str, str], Entry] = {}
    for report in reports:
        for entry in report["features"]:
            key = (entry["role"], entry["name"])
            if key not in features:
                features[key] = {**entry, "live": dict(entry["live"])}
            elif _same(features[key], entry):
                features[key]["live"] = _add_live(features[key], entry)
    merged = worst_first(banded([score(e) for e in features.values()]))
    samples = {k: sum(r["samples"][k] for r in reports) for k in first["samples"]}
    window = dict(first["window"])
    window["rows"] = sum(r["window"]["rows"] for r in reports)
    starts = [r["window"]["start"] for r in reports if r["window"]["start"] is not None]
    window["start"] = min(starts) if starts else None
    problems: dict[str, str] = {}
    for report in reports:
        problems.update(report["problems"])
    first.update(features=merged, samples=samples, window=window, problems=problems,
                 summary={**summary(merged), "features": len(merged)},
                 comparisons=_merge_comparisons(r["comparisons"] for r in reports),
                 workers=len(reports))
    return first


def _same(a: Entry, b: Entry) -> bool:
    return a.get("cuts") == b.get("cuts") and a.get("categories") == b.get("categories")


def _add_live(a: Entry, b: Entry) -> Entry:
    x, y = a["live"], b["live"]
    counts = [p + q for p, q in zip(x["counts"], y["counts"], strict=True)]
    if a["type"] == "categorical":
        return categorical_live(counts)
    lows = [v for v in (x["min"], y["min"]) if v is not None]
    highs = [v for v in (x["max"], y["max"]) if v is not None]
    return numeric_live(x["count"] + y["count"], x["sum"] + y["sum"],
                        x["sum_squares"] + y["sum_squares"], low=min(lows, default=math.inf),
                        high=max(highs, default=-math.inf), nan=x["nan"] + y["nan"],
                        inf=x["inf"] + y["inf"], counts=counts)


def _merge_comparisons(groups: Iterable[list[Entry]]) -> list[Entry]:
    merged: dict[tuple[str, int, int], Entry] = {}
    for group in groups:
        for comparison in group:
            key = (comparison["relation"], comparison["version"], comparison["other_version"])
            if key not in merged:
                merged[key] = {**comparison, "features": [dict(f) for f in
                                                          comparison["features"]]}
                continue
            mine = {f["name"]: f for f in merged[key]["features"]}
            for feature in comparison["features"]:
                if feature["name"] in mine and len(mine[feature["name"]]["counts"]) == len(
                        feature["counts"]):
                    target = mine[feature["name"]]
                    target["counts"] = [p + q for p, q in zip(target["counts"],
                                                              feature["counts"], strict=True)]
                    target["other_counts"] = [p + q for p, q in zip(
                        target["other_counts"], feature["other_counts"], strict=True)]
    for comparison in merged.values():
        for feature in comparison["features"]:
            enough = min(sum(feature["counts"]), sum(feature["other_counts"])) >= MIN_VALUES
            feature.update(scores(feature["other_counts"], feature["counts"]) if enough
                           else {m: None for m in METHODS})
        comparison["features"] = worst_first(banded(comparison["features"],
                                                    counts=compared_counts))
    return list(merged.values())
