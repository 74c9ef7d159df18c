"""Prometheus families for model version lifecycle and shadow traffic, read from the model
manager at scrape time: version states, load/warm-up failures, shadow outcomes and latency."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from gateway.models.manager import ModelManager, VersionState

NAMESPACE = "modelgate"


class VersionCollector(Collector):
    """A custom collector: the manager stays the one source of truth, nothing is mirrored
    into metric objects on the request path. Scrapes run off the event loop, so every
    container is copied before it is walked."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            f"{NAMESPACE}_model_version_state",
            "1 for the lifecycle state each model version is in",
            labels=["model", "version", "state"],
        )
        for model in self._manager.models():
            for number, version in sorted(list(model.versions.items())):
                for kind in VersionState:
                    state.add_metric([model.name, str(number), kind.value],
                                     1.0 if version.state is kind else 0.0)
        yield state
        failures = CounterMetricFamily(
            f"{NAMESPACE}_model_load_failures",
            "model versions that failed to load or warm up (they never took traffic)",
            labels=["model"],
        )
        for name, count in sorted(dict(self._manager.load_failures).items()):
            failures.add_metric([name], float(count))
        yield failures
        yield from self._shadow()

    def _shadow(self) -> Iterator[Metric]:
        outcomes = CounterMetricFamily(
            f"{NAMESPACE}_shadow_requests",
            "mirrored requests by outcome (agreed, disagreed, error, skipped)",
            labels=["model", "primary", "shadow", "outcome"],
        )
        latency = SummaryMetricFamily(
            f"{NAMESPACE}_shadow_latency_seconds",
            "latency of the shadow version on mirrored requests",
            labels=["model", "primary", "shadow"],
        )
        difference = GaugeMetricFamily(
            f"{NAMESPACE}_shadow_max_abs_diff",
            "largest absolute difference seen between primary and shadow float outputs",
            labels=["model", "primary", "shadow"],
        )
        for (model, primary, shadow), stats in sorted(self._manager.shadow.stats().items()):
            labels = [model, str(primary), str(shadow)]
            for outcome, count in (("agreed", stats.agreed), ("disagreed", stats.disagreed),
                                   ("error", stats.errors), ("skipped", stats.skipped)):
                outcomes.add_metric([*labels, outcome], float(count))
            latency.add_metric(labels, count_value=stats.mirrored, sum_value=stats.latency_s_sum)
            difference.add_metric(labels, stats.max_abs_diff)
        yield outcomes
        yield latency
        yield difference
