"""Counters, gauges and histograms for the request path: updated only from the event loop
thread, so without locks (prometheus_client takes a lock per update), and exported as
ordinary Prometheus families by a collector that a scrape thread may call at any time."""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar, cast

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString


class Count:
    """A counter's value."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class Level(Count):
    """A gauge's value."""

    __slots__ = ()

    def dec(self, amount: float = 1.0) -> None:
        self.value -= amount


class Buckets:
    """A histogram's bucket counts (not cumulative: ``counts[i]`` holds the observations
    in (bounds[i-1], bounds[i]], the last one those above every bound) and their sum."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are "less than or equal": bisect_left finds the first bound
        # that is >= value.
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.total += value


Child = TypeVar("Child", Count, Level, Buckets)


class Family(Generic[Child]):
    """One metric family: a child per label-value tuple, created on first use."""

    def __init__(
        self, new: Callable[[], Child], name: str, documentation: str,
        labelnames: Sequence[str],
    ) -> None:
        self._new: Callable[[], Child] = new
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], Child] = {}

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name} takes labels {self.labelnames}, got {values}")
            child = self._new()
            self._children[values] = child
        return child

    def metric(self) -> Metric:
        """The family as Prometheus sees it. Called from a scrape thread: each container is
        copied by one C-level call (atomic under the GIL) before it is walked."""
        children = list(self._children.items())
        labels = list(self.labelnames)
        family: CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily
        if self._new is Count:
            family = CounterMetricFamily(self.name, self.documentation, labels=labels)
        elif self._new is Level:
            family = GaugeMetricFamily(self.name, self.documentation, labels=labels)
        else:
            family = HistogramMetricFamily(self.name, self.documentation, labels=labels)
        for values, child in children:
            if isinstance(child, Buckets):
                assert isinstance(family, HistogramMetricFamily)
                family.add_metric(list(values), _cumulative(child), child.total)
            else:
                assert not isinstance(family, HistogramMetricFamily)
                family.add_metric(list(values), child.value)
        return family


def _cumulative(child: Buckets) -> list[tuple[str, float]]:
    counts = list(child.counts)
    out: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*child.bounds, math.inf), counts, strict=True):
        running += count
        out.append((_le(bound), float(running)))
    return out


# The spelling prometheus_client gives bucket bounds ('+Inf', '5e-05', '1.0').
_le = cast(Callable[[float], str], floatToGoString)


class LoopMetrics(Collector):
    """The collector of a set of families, registered once in a registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._families: list[Family[Count] | Family[Level] | Family[Buckets]] = []
        registry.register(self)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str]) -> Family[Count]:
        family = Family(Count, name, documentation, labelnames)
        self._families.append(family)
        return family

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str]) -> Family[Level]:
        family = Family(Level, name, documentation, labelnames)
        self._families.append(family)
        return family

    def histogram(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> Family[Buckets]:
        bounds = tuple(float(b) for b in buckets)
        family = Family(lambda: Buckets(bounds), name, documentation, labelnames)
        self._families.append(family)
        return family

    def collect(self) -> Iterator[Metric]:
        for family in self._families:
            yield family.metric()

    def describe(self) -> Iterator[Metric]:
        # Names only, so registering checks for duplicates without collecting values.
        for family in self._families:
            yield family.metric()
