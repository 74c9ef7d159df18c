"""Prometheus gauges for what serving depends on outside the process, read at scrape time:
each Triton upstream's health as the upstream pool's probes find it, and the Redis quota store."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.quota.redis_store import FAIL_OPEN, RedisQuotaStore
from gateway.quota.store import QuotaStore
from runtimes.upstreams import UpstreamPool

NAMESPACE: Final = "modelgate"


class DependencyCollector(Collector):
    """Reads the upstream pool and the quota store as they are when scraped; nothing is
    mirrored on the request path. Scrapes run off the event loop: the pool's dict of
    upstreams is only read, and a declared upstream it does not hold (not started yet, or
    closed) reads as down."""

    def __init__(self, upstreams: UpstreamPool, quota: QuotaStore) -> None:
        self._upstreams = upstreams
        self._quota = quota

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            f"{NAMESPACE}_upstream_up",
            "1 while the gateway's probes find the Triton upstream live and ready "
            "(ServerReady); 0 while it is out of rotation",
            labels=["upstream"],
        )
        held = self._upstreams.upstreams
        for name in sorted(self._upstreams.configs):
            upstream = held.get(name)
            up.add_metric([name], 1.0 if upstream is not None and upstream.healthy else 0.0)
        yield up
        redis = self._quota if isinstance(self._quota, RedisQuotaStore) else None
        reachable = GaugeMetricFamily(
            f"{NAMESPACE}_redis_up",
            "1 while the shared quota store (Redis) answers, 0 while it is found unreachable "
            "(no sample without a redis_url)",
        )
        fail_open = GaugeMetricFamily(
            f"{NAMESPACE}_redis_fail_open",
            "1 while Redis is unreachable and requests are admitted under this process's own "
            "limits (redis_failure_mode fail-open); else 0",
        )
        down = redis is not None and not redis.available
        if redis is not None:
            reachable.add_metric([], 0.0 if down else 1.0)
        open_now = down and redis is not None and redis.failure_mode == FAIL_OPEN
        fail_open.add_metric([], 1.0 if open_now else 0.0)
        yield reachable
        yield fail_open
