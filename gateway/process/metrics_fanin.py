"""The supervisor's metrics port when several workers serve: scrapes every worker's own
registry over loopback and answers /metrics with the samples merged, plus /healthz, /readyz
and the drift reports (every worker's, merged)."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Final

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

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


class MetricsFanIn:
    """A small threaded HTTP server; ``worker_ports`` is read on every request, so workers
    that restart on new ports are picked up."""

    def __init__(self, worker_ports: Callable[[], Mapping[int, int]], expected: int) -> None:
        self._ports = worker_ports
        self._expected = expected
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    def start(self, host: str, port: int) -> int:
        fan_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path, _, query = self.path.partition("?")
                status, content_type, body = fan_in.respond(path, query)
                self.send_response(status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass  # scrapes and probes every few seconds are not news

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self.port = int(self._server.server_address[1])
        threading.Thread(target=self._server.serve_forever, name="metrics-fan-in",
                         daemon=True).start()
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def respond(self, path: str, query: str = "") -> tuple[int, str, bytes]:
        """The answer to GET ``path``: (status, content type, body)."""
        text = "text/plain; charset=utf-8"
        ports = dict(self._ports())
        if drift_path(path) is not None:
            # Every worker's report of its share, merged histogram by histogram.
            suffix = f"{path}?{query}" if query else path
            answers: list[tuple[int, dict[str, Any]]] = []
            for worker_port in ports.values():
                status, body = _get(f"http://127.0.0.1:{worker_port}{suffix}")
                with contextlib.suppress(ValueError):
                    if status in (200, 400, 404):
                        answers.append((status, json.loads(body)))
            code, merged = merge_answers(answers)
            return code, JSON_TYPE, encode(merged)
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/metrics":
            scraped = [_get(f"http://127.0.0.1:{p}/metrics") for p in ports.values()]
            bodies = [body.decode("utf-8") for status, body in scraped if status == 200]
            if len(bodies) < len(ports):
                log.warning("metrics: %d of %d workers did not answer the scrape",
                            len(ports) - len(bodies), len(ports))
            return 200, CONTENT_TYPE, merge_expositions(bodies)
        if path == "/readyz":
            details: dict[str, object] = {}
            for index in range(self._expected):
                port = ports.get(index)
                if port is None:
                    details[f"worker {index}"] = "starting"
                    continue
                status, body = _get(f"http://127.0.0.1:{port}/readyz")
                if status != 200:
                    details[f"worker {index}"] = body.decode("utf-8", "replace").strip()
            ready = not details
            payload = json.dumps({"ready": ready, "not_ready": details}, sort_keys=True)
            return (200 if ready else 503), "application/json", payload.encode() + b"\n"
        return 404, text, b"not found\n"
