"""deploy/observability: every series the Grafana dashboard and the alert rules query is one
a running gateway exports (scraped from its /metrics), and promtool accepts the PromQL."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.gateway import REPO_ROOT, running_gateway

pytestmark = pytest.mark.timeout(120)

OBSERVABILITY = REPO_ROOT / "deploy" / "observability"
DASHBOARD = OBSERVABILITY / "modelgate-dashboard.json"
ALERTS = OBSERVABILITY / "alerts.yaml"
# Series Prometheus makes itself for every scrape target (gateways and Triton upstreams).
PROMETHEUS_SERIES = {"up"}
SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{")
LABEL_VALUES = re.compile(r"label_values\(\s*([a-zA-Z_:][a-zA-Z0-9_:]*)")
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum"),
            "summary": ("_count", "_sum")}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"]
                if v["type"] == "query"]
    return queries


def alert_queries() -> list[str]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule["expr"] for group in groups for rule in group["rules"]]


def series_of(query: str) -> set[str]:
    """The series names a query selects; every selector is written ``name{...}``."""
    return set(SELECTOR.findall(query)) | set(LABEL_VALUES.findall(query))


def exported_series(exposition: str) -> set[str]:
    names: set[str] = set()
    for family in text_string_to_metric_families(exposition):
        names.add(family.name)
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ()))
        names.update(sample.name for sample in family.samples)
    return names


@pytest.fixture(scope="module")
def exported() -> set[str]:
    """What a gateway serving the demo store exports after answering a few calls."""
    with running_gateway() as gateway, tc.InferenceServerClient(gateway.target) as client:
        data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        tensor = tc.InferInput("features", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        client.infer("iris", [tensor])
        with pytest.raises(tc.InferenceServerException):
            client.infer("iris", [tc.InferInput("wrong", [1, 4], "FP32")])
        port = gateway.gateway.metrics_port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
            return exported_series(answer.read().decode())


def test_every_series_the_dashboard_queries_is_exported(exported: set[str]) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 10
    for query in queries:
        assert series_of(query), f"no series found in {query!r}"
    unknown = {name for q in queries for name in series_of(q)} - exported - PROMETHEUS_SERIES
    assert unknown == set(), f"the dashboard queries series the gateway does not export: {unknown}"


def test_every_series_the_alerts_query_is_exported(exported: set[str]) -> None:
    queries = alert_queries()
    unknown = {name for q in queries for name in series_of(q)} - exported - PROMETHEUS_SERIES
    assert unknown == set(), f"the alerts query series the gateway does not export: {unknown}"
    assert all(series_of(q) for q in queries)


def test_the_matcher_catches_a_misspelled_series(exported: set[str]) -> None:
    assert series_of('rate(modelgate_inference_request_total{model="a"}[5m])') - exported == {
        "modelgate_inference_request_total"}


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("promtool")
    if executable is None:
        pytest.fail("promtool is not on PATH: run scripts/install_test_deps.sh")
    return subprocess.run([executable, *args], capture_output=True, text=True, timeout=60,
                          check=False)


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 9 rules found" in result.stdout


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    # Grafana's variables replaced by what they stand for, each query a recording rule.
    variables = {"$__rate_interval": "5m", "$model": ".*", "$version": ".*", "$tenant": ".*"}
    rules = []
    for index, query in enumerate(q for q in dashboard_queries() if "label_values" not in q):
        expr = query
        for name, value in variables.items():
            expr = expr.replace(name, value)
        rules.append({"record": f"dashboard:query_{index}", "expr": expr})
    path = tmp_path / "dashboard_rules.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    broken = tmp_path / "broken.yaml"
    broken.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [
        {"record": "dashboard:broken", "expr": "sum by (model (x{})"}]}]}))
    assert promtool("check", "rules", str(broken)).returncode != 0
