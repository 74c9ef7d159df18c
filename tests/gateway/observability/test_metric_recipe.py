"""The map's new-metric recipe, done once: a family on the gateway's one registry
(``Metrics.registry``), counted through a callable handed to the code that sees the event,
and a collector read at scrape time, are served by the metrics port with no other change."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from prometheus_client import Counter
from prometheus_client.core import GaugeMetricFamily, Metric

from gateway.models.manager import ModelManager
from tests.gateway.observability.test_metrics import scrape
from tests.support.gateway import running_gateway
from tests.support.models import add_constant, add_model_config, write_model


class ModelsCollector:
    """A figure read when scraped, like VersionCollector: how many models are known."""

    def __init__(self, manager: ModelManager) -> None:
        self._manager = manager

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily("modelgate_toy_models", "Models the manager knows")
        family.add_metric([], len(self._manager.models()))
        yield family


def test_a_family_and_a_collector_on_the_registry_are_served(tmp_path: Path) -> None:
    write_model(tmp_path, "add", 1, add_constant(1.0), add_model_config("add"))
    with running_gateway(tmp_path) as gw:
        metrics = gw.gateway.metrics
        toys = Counter("toy_events", "Toy events, by kind", ("kind",),
                       namespace="modelgate", registry=metrics.registry)

        def count_toy(kind: str) -> None:  # what the counting module is handed
            toys.labels(kind).inc()

        metrics.registry.register(ModelsCollector(gw.gateway.manager))
        count_toy("seen")
        count_toy("seen")
        samples = scrape(gw)
        assert samples[("modelgate_toy_events_total", frozenset({("kind", "seen")}))] == 2
        assert samples[("modelgate_toy_models", frozenset())] == 1
