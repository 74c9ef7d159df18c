"""The supervisor's metrics port when several workers serve: scrapes every worker's own
registry over loopback and answers /metrics with the samples merged, plus /healthz, /readyz
and the drift reports (every worker's, merged), on the REST port's HTTP stack."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from gateway.http.connection import Limits
from gateway.http.listener import HttpListener
from gateway.http.messages import HttpRequest, HttpResponse
from gateway.http.route_table import RouteTable, alive, not_found
from gateway.monitoring.endpoint import JSON_TYPE, drift_path, encode, merge_answers

log = logging.getLogger(__name__)

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"
_SCRAPE_TIMEOUT_S: Final = 2.0

# Samples that do not add up across processes: the earliest start time is the process's;
# a drift score is each worker's on its share of the samples, the highest one is kept (so
# is a count of features per band: the worst worker's, not a sum over shares);
# a dependency is up only while every worker finds it up, and a worker in fail-open makes
# the gateway's limits per process.
_TAKE_MIN: Final = ("process_start_time_seconds", "modelgate_upstream_up", "modelgate_redis_up")
_TAKE_MAX: Final = ("modelgate_drift", "modelgate_drift_max", "modelgate_drift_mean",
                    "modelgate_drift_comparison", "modelgate_drift_features",
                    "modelgate_drift_comparison_features", "modelgate_redis_fail_open")
_TAKE_FIRST_TYPES: Final = frozenset({"info"})


def merge_expositions(texts: Iterable[str]) -> bytes:
    """Merge Prometheus text expositions of identical registries: counters, histograms and
    gauges with equal labels are summed (queue depth, in-flight and memory add up across
    workers); start times take the minimum; info samples the first value seen."""
    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(
                family.name, Metric(family.name, family.documentation, family.type)
            )
            samples = values.setdefault(family.name, {})
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in samples:
                    samples[key] = sample.value
                elif sample.name in _TAKE_MIN or sample.name.endswith("_created"):
                    samples[key] = min(samples[key], sample.value)
                elif sample.name in _TAKE_MAX:
                    samples[key] = max(samples[key], sample.value)
                elif merged.type not in _TAKE_FIRST_TYPES:
                    samples[key] += sample.value
    registry = CollectorRegistry(auto_describe=False)
    collected: list[Metric] = []
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
        collected.append(metric)
    registry.register(_Fixed(collected))
    return generate_latest(registry)


class _Fixed:
    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> Iterable[Metric]:
        return self._metrics


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()
    except (urllib.error.URLError, OSError) as exc:
        return 0, str(exc).encode()


async def _get_all(urls: Iterable[str]) -> list[tuple[int, bytes]]:
    """GET every url at once (each in a thread: a worker that hangs costs its timeout)."""
    return list(await asyncio.gather(*(asyncio.to_thread(_get, url) for url in urls)))


class MetricsFanIn:
    """The supervisor's metrics port: a route table on the REST port's HTTP stack, served
    from an event loop in a thread of its own (the supervisor's main thread keeps its
    signals and the workers). ``worker_ports`` is read on every request, so workers that
    restart on new ports are picked up."""

    def __init__(self, worker_ports: Callable[[], Mapping[int, int]], expected: int,
                 limits: Limits) -> None:
        self._ports = worker_ports
        self._expected = expected
        routes = RouteTable({"/metrics": self._scrape, "/healthz": alive,
                             "/readyz": self._ready}, [("/v2/models/", self._drift)])
        self._listener = HttpListener(routes.handle, limits)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port. Raises OSError when it cannot bind."""
        loop = asyncio.new_event_loop()
        thread = threading.Thread(target=loop.run_forever, name="metrics-fan-in", daemon=True)
        thread.start()
        self._loop, self._thread = loop, thread
        bound = asyncio.run_coroutine_threadsafe(
            self._listener.start(host, port, reuse_port=False), loop)
        try:
            self.port = bound.result()
        except OSError:
            self.stop()
            raise
        return self.port

    def stop(self, grace: float = 2.0) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None
        stopped = asyncio.run_coroutine_threadsafe(self._listener.stop(grace), loop)
        with contextlib.suppress(Exception):
            stopped.result(grace + 5.0)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5.0)
        if not thread.is_alive():
            loop.close()

    async def _drift(self, request: HttpRequest) -> HttpResponse:
        """Every worker's report of its share, merged histogram by histogram."""
        if drift_path(request.path) is None:
            return not_found()
        suffix = f"{request.path}?{request.query}" if request.query else request.path
        answers: list[tuple[int, dict[str, Any]]] = []
        ports = self._ports().values()
        for status, body in await _get_all(f"http://127.0.0.1:{p}{suffix}" for p in ports):
            with contextlib.suppress(ValueError):
                if status in (200, 400, 404):
                    answers.append((status, json.loads(body)))
        code, merged = merge_answers(answers)
        return HttpResponse(code, encode(merged), JSON_TYPE)

    async def _scrape(self, request: HttpRequest) -> HttpResponse:
        ports = self._ports()
        scraped = await _get_all(f"http://127.0.0.1:{p}/metrics" for p in ports.values())
        bodies = [body.decode("utf-8") for status, body in scraped if status == 200]
        if len(bodies) < len(ports):
            log.warning("metrics: %d of %d workers did not answer the scrape",
                        len(ports) - len(bodies), len(ports))
        # Parsing and merging every family is CPU work; keep it off the loop.
        return HttpResponse(200, await asyncio.to_thread(merge_expositions, bodies),
                            CONTENT_TYPE)

    async def _ready(self, request: HttpRequest) -> HttpResponse:
        ports = self._ports()
        details: dict[str, object] = {
            f"worker {index}": "starting" for index in range(self._expected)
            if index not in ports}
        serving = [index for index in range(self._expected) if index in ports]
        urls = (f"http://127.0.0.1:{ports[index]}/readyz" for index in serving)
        for index, (status, body) in zip(serving, await _get_all(urls), strict=True):
            if status != 200:
                details[f"worker {index}"] = body.decode("utf-8", "replace").strip()
        ready = not details
        payload = json.dumps({"ready": ready, "not_ready": details}, sort_keys=True)
        return HttpResponse(200 if ready else 503, payload.encode() + b"\n", JSON_TYPE)
