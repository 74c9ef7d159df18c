"""The lock-free request-path metrics: what a scrape shows is what Prometheus' own types
would show (names, _total, cumulative le buckets, _count and _sum), read from any thread."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from gateway.observability.loop_metrics import LoopMetrics

BUCKETS = (0.001, 0.01, 0.1)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text) for s in family.samples
        if not s.name.endswith("_created")
    }


def test_histogram_matches_prometheus_client() -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    histogram = LoopMetrics(ours).histogram("h_seconds", "doc", ("model",), BUCKETS)
    reference = Histogram("h_seconds", "doc", ("model",), registry=theirs, buckets=BUCKETS)
    for value in (0.0005, 0.001, 0.0011, 0.01, 0.05, 0.1, 0.5, 7.0):
        histogram.labels("m").observe(value)
        reference.labels("m").observe(value)
    assert samples(ours) == samples(theirs)
    assert samples(ours)[("h_seconds_bucket", (("le", "0.001"), ("model", "m")))] == 2


def test_counters_and_gauges_expose_like_prometheus() -> None:
    registry = CollectorRegistry()
    metrics = LoopMetrics(registry)
    counter = metrics.counter("requests", "doc", ("code",))
    gauge = metrics.gauge("depth", "doc", ("model",))
    counter.labels("OK").inc()
    counter.labels("OK").inc(2)
    counter.labels("NOT_FOUND").inc()
    gauge.labels("m").inc(5)
    gauge.labels("m").dec(2)
    got = samples(registry)
    assert got[("requests_total", (("code", "OK"),))] == 3
    assert got[("requests_total", (("code", "NOT_FOUND"),))] == 1
    assert got[("depth", (("model", "m"),))] == 3


def test_a_scrape_thread_sees_consistent_histograms_while_the_loop_writes() -> None:
    registry = CollectorRegistry()
    histogram = LoopMetrics(registry).histogram("h", "doc", ("model",), BUCKETS)
    stop = threading.Event()
    problems: list[str] = []

    def scrape() -> None:
        while not stop.is_set():
            got = samples(registry)
            buckets = sorted(
                (float(dict(labels)["le"]), value)
                for (name, labels), value in got.items() if name == "h_bucket"
            )
            counts = [value for _, value in buckets]
            if counts != sorted(counts):
                problems.append(f"buckets not cumulative: {buckets}")
            if buckets and got[("h_count", (("model", "m"),))] != counts[-1]:
                problems.append("count differs from the +Inf bucket")

    thread = threading.Thread(target=scrape)
    thread.start()
    child = histogram.labels("m")
    for index in range(50_000):
        child.observe((index % 200) / 1000)
    stop.set()
    thread.join()
    assert problems == []
    assert samples(registry)[("h_count", (("model", "m"),))] == 50_000
