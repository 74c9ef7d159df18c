"""Prometheus families of the drift monitor, computed at scrape time over the default
window: per-feature scores for the top-k drifting features of each version (the cap keeps
label cardinality bounded whatever the feature count), per-version max and mean, samples."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.monitoring.monitor import Monitor
from gateway.monitoring.report import METHODS, Models, ShadowFigures, version_report
from gateway.monitoring.verdict import BANDS
from gateway.monitoring.windows import DEFAULT_WINDOW

NAMESPACE = "modelgate"


class DriftCollector(Collector):
    """Reads the monitor's windows on each scrape (off the event loop: the metrics port
    collects in a thread); nothing is updated on the request path for it."""

    def __init__(self, monitor: Monitor, models: Models | None = None,
                 shadow: ShadowFigures | None = None) -> None:
        self._monitor = monitor
        self._models = models
        self._shadow = shadow

    def collect(self) -> Iterator[Metric]:
        top = max(0, self._monitor.config.top_features)
        drift = GaugeMetricFamily(
            f"{NAMESPACE}_drift",
            f"drift score of a feature against the version's reference over the last "
            f"{DEFAULT_WINDOW} (psi, js, ks); only the {top} highest-PSI features per version",
            labels=["model", "version", "feature", "method"])
        high = GaugeMetricFamily(
            f"{NAMESPACE}_drift_max", "highest drift score over a version's scored features",
            labels=["model", "version", "method"])
        mean = GaugeMetricFamily(
            f"{NAMESPACE}_drift_mean", "mean drift score over a version's scored features",
            labels=["model", "version", "method"])
        scored = GaugeMetricFamily(
            f"{NAMESPACE}_drift_features",
            "a version's features: all, scored (a reference and enough live values), and "
            "those in each band (ok, watch, act, insufficient; docs/monitoring.md: verdicts)",
            labels=["model", "version", "status"])
        compared = GaugeMetricFamily(
            f"{NAMESPACE}_drift_comparison",
            "highest drift score over the output features of a version against a related "
            "version's live outputs (canary vs stable, shadow vs primary, weighted split)",
            labels=["model", "version", "other_version", "relation", "method"])
        compared_bands = GaugeMetricFamily(
            f"{NAMESPACE}_drift_comparison_features",
            "output features of a version compared with a related version's, by band",
            labels=["model", "version", "other_version", "relation", "status"])
        samples = CounterMetricFamily(
            f"{NAMESPACE}_drift_samples", "inferences handed to the drift monitor",
            labels=["model", "version"])
        dropped = CounterMetricFamily(
            f"{NAMESPACE}_drift_samples_dropped",
            "inferences due for sampling but dropped (queue_full: the worker's queue was "
            "full; rate_cap: over monitoring_max_rows_per_s)",
            labels=["model", "version", "reason"])
        if self._models is not None:
            self._monitor.sync(self._models())
        for gate in self._monitor.gates():
            state = self._monitor.state(gate.version.id.name, gate.version.id.version)
            # A replaced version's counters end with it; its successor's start again.
            if not gate.enabled or (state is not None and state.served is not gate.version):
                continue
            labels = [gate.version.id.name, str(gate.version.id.version)]
            samples.add_metric(labels, float(gate.taken))
            dropped.add_metric([*labels, "queue_full"], float(gate.dropped_full))
            dropped.add_metric([*labels, "rate_cap"], float(gate.dropped_rate))
        for state in self._monitor.states():
            report = version_report(self._monitor, state.model, state.number, DEFAULT_WINDOW,
                                    models=self._models, shadow=self._shadow)
            if report is None:
                continue
            labels = [state.model, str(state.number)]
            summary = report["summary"]
            scored.add_metric([*labels, "all"], float(summary["features"]))
            scored.add_metric([*labels, "scored"], float(summary["scored"]))
            for band, count in summary["bands"].items():
                scored.add_metric([*labels, band], float(count))
            for method in METHODS:
                if summary[f"{method}_max"] is not None:
                    high.add_metric([*labels, method], summary[f"{method}_max"])
                    mean.add_metric([*labels, method], summary[f"{method}_mean"])
            # Features come worst first (highest PSI); unscored ones are never exported.
            for feature in [f for f in report["features"] if f["psi"] is not None][:top]:
                for method in METHODS:
                    drift.add_metric([*labels, feature["name"], method], feature[method])
            for comparison in report["comparisons"]:
                if comparison["version"] != state.number:
                    continue
                pair = [*labels, str(comparison["other_version"]), comparison["relation"]]
                for band in BANDS:
                    compared_bands.add_metric([*pair, band], float(sum(
                        1 for f in comparison["features"] if f.get("band") == band)))
                for method in METHODS:
                    values = [f[method] for f in comparison["features"]
                              if f[method] is not None]
                    if values:
                        compared.add_metric([*pair, method], max(values))
        yield from (drift, high, mean, scored, compared, compared_bands, samples, dropped)
