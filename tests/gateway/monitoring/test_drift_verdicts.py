"""Drift verdicts against the real gateway with the demo store's models and profiles: their
own training data is ok on every feature and output, a one-standard-deviation shift of one
feature is act on that feature alone, a few samples are insufficient, a reload names its new
reference at once, and a profile built from a CSV names features by its header."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits, load_iris

from gateway.process.cli import main
from gateway.settings import demo_store
from tests.support.gateway import REPO_ROOT, RunningGateway, running_gateway
from tests.support.models import add_constant, add_model_config, write_model
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(600)

SHIFTED = 10  # the digits pixel shifted by one standard deviation
# The stated detection: act on the shifted pixel within this many sampled rows.
SHIFT_ROWS = 200
HEADER = ("sepal_length", "sepal_width", "petal_length", "petal_width")
COPIES = {"digits_shift": "digits", "iris_few": "iris", "iris_reload": "iris",
          "iris_alert": "iris"}
ALERTS = REPO_ROOT / "docs" / "monitoring-alerts.yml"


def _copy(source: Path, target: Path, name: str) -> None:
    shutil.copytree(source, target)
    config = target / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    config.write_text(re.sub(r'^name: ".*"$', f'name: "{name}"', text, count=1,
                             flags=re.MULTILINE), encoding="utf-8")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for name in ("digits", "iris"):
        shutil.copytree(demo_store() / name, root / name)
    for name, source in COPIES.items():
        _copy(demo_store() / source, root / name, name)
    write_model(root, "adder", 1, add_constant(1.0), add_model_config("adder"))
    return root


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store, monitoring_sample_every=1, monitoring_max_rows_per_s=0,
                         monitoring_exclude=("adder",), poll_interval=0.2) as gw:
        yield gw


def _send(client: tc.InferenceServerClient, model: str, name: str, rows: np.ndarray,
          version: str = "", *, single: int = 0) -> None:
    """``rows`` in one-row requests for the first ``single``, then ten-row requests."""
    batches = [rows[i:i + 1] for i in range(single)] + [
        rows[i:i + 10] for i in range(single, len(rows), 10)]
    for batch in batches:
        tensor = tc.InferInput(name, list(batch.shape), "FP32")
        tensor.set_data_from_numpy(batch.astype(np.float32))
        client.infer(model, [tensor], model_version=version)


def _get(gateway: RunningGateway, path: str) -> tuple[int, dict[str, Any]]:
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), json.loads(exc.read())


def _report(gateway: RunningGateway, model: str, version: int, rows: int) -> dict[str, Any]:
    path = f"/v2/models/{model}/versions/{version}/drift?window=5m"

    def ready() -> bool:
        status, body = _get(gateway, path)
        return status == 200 and body["window"]["rows"] >= rows

    wait_until(ready, f"{rows} rows of {model}/{version} in the drift report", timeout=60)
    return _get(gateway, path)[1]


def _bands(report: dict[str, Any]) -> dict[str, str]:
    return {f["name"]: f["band"] for f in report["features"]}


def test_the_demo_stores_own_training_data_is_ok_on_every_feature_and_output(
    gateway: RunningGateway, client: tc.InferenceServerClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    rng = np.random.default_rng(0)
    iris = load_iris().data
    # Three shuffled passes: the first in one-row requests, the others in ten-row ones.
    passes = np.concatenate([rng.permutation(iris) for _ in range(3)])
    for label in ("1", "2"):
        _send(client, "iris", "features", passes, label, single=len(iris))
    digits = rng.permutation(load_digits().data / 16.0)
    _send(client, "digits", "pixels", digits, single=200)
    for model, version, rows in (("iris", 1, len(passes)), ("iris", 2, len(passes)),
                                 ("digits", 1, len(digits))):
        report = _report(gateway, model, version, rows)
        bands = _bands(report)
        assert set(bands.values()) == {"ok"}, (model, version, {
            n: b for n, b in bands.items() if b != "ok"})
        assert report["summary"]["bands"] == {"ok": len(bands), "watch": 0, "act": 0,
                                              "insufficient": 0}
    # `modelgate drift` says the same, one line per feature and output.
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}"
    for model, features in (("iris", 4 + 3 + 1), ("digits", 64 + 10 + 1)):
        assert main(["drift", model, "--url", url, "--top", "100"]) == 0
        lines = [line.split() for line in capsys.readouterr().out.splitlines()
                 if re.match(r"\s+(features|pixels|probabilities|label)\b", line)]
        versions = 2 if model == "iris" else 1
        assert len(lines) == features * versions
        assert {line[3] for line in lines} == {"ok"}


def test_one_feature_shifted_by_one_sd_is_act_on_that_feature_alone(
    gateway: RunningGateway, client: tc.InferenceServerClient,
) -> None:
    pixels = np.random.default_rng(1).permutation(load_digits().data / 16.0)[:SHIFT_ROWS]
    pixels[:, SHIFTED] += (load_digits().data[:, SHIFTED] / 16.0).std()
    _send(client, "digits_shift", "pixels", pixels, single=20)
    report = _report(gateway, "digits_shift", 1, SHIFT_ROWS)
    bands = _bands(report)
    assert bands[f"pixels[{SHIFTED}]"] == "act"
    assert {n for n, b in bands.items() if b in ("act", "watch")} == {f"pixels[{SHIFTED}]"}
    assert report["features"][0]["name"] == f"pixels[{SHIFTED}]"  # worst first


def test_a_few_samples_are_insufficient_with_the_count_needed(
    gateway: RunningGateway, client: tc.InferenceServerClient,
) -> None:
    rows = load_iris().data[::5]  # 30 rows, every class
    _send(client, "iris_few", "features", rows, "1", single=10)
    report = _report(gateway, "iris_few", 1, len(rows))
    assert set(_bands(report).values()) == {"insufficient"}
    for feature in report["features"]:
        assert feature["needed"] is None or feature["needed"] > len(rows), feature
    inputs = [f for f in report["features"] if f["role"] == "input"]
    assert all(f["needed"] is not None for f in inputs)


def test_a_reload_names_its_new_reference_at_once_and_a_csv_header_names_features(
    gateway: RunningGateway, client: tc.InferenceServerClient, store: Path, tmp_path: Path,
) -> None:
    path = "/v2/models/iris_reload/versions/1/drift"
    # Before any inference: the version is monitored, its reference named, 0 samples.
    status, before = _get(gateway, path)
    assert status == 200, before
    assert before["reference"]["kind"] == "profile"
    assert "load_iris" in before["reference"]["built_from"]
    assert before["samples"]["taken"] == 0 and before["window"]["rows"] == 0
    _send(client, "iris_reload", "features", load_iris().data[:40], "1")
    assert _report(gateway, "iris_reload", 1, 40)["samples"]["taken"] == 4

    csv = tmp_path / "iris.csv"
    np.savetxt(csv, load_iris().data, delimiter=",", header=",".join(HEADER), comments="",
               fmt="%.1f")
    assert main(["profile", "iris_reload", "1", "--store", str(store), "--data", str(csv),
                 "--force"]) == 0

    def reloaded() -> bool:
        return "iris.csv" in (_get(gateway, path)[1]["reference"]["built_from"] or "")

    wait_until(reloaded, "the reloaded version's report naming its new profile", timeout=60)
    after = _get(gateway, path)[1]
    assert after["samples"]["taken"] == 0 and after["window"]["rows"] == 0
    names = {f["name"] for f in after["features"] if f["role"] == "input"}
    assert names == set(HEADER)


def test_each_case_of_the_drift_route_gets_its_own_answer(gateway: RunningGateway) -> None:
    status, body = _get(gateway, "/v2/models/nothing/versions/1/drift")
    assert status == 404 and body["error"] == "unknown model 'nothing'"
    status, body = _get(gateway, "/v2/models/adder/drift")
    assert status == 404 and "not monitored" in body["error"]
    assert "monitoring_exclude" in body["error"]
    status, body = _get(gateway, "/v2/models/iris/versions/9/drift")
    assert status == 404 and body["error"] == "model 'iris' has no version 9"
    status, body = _get(gateway, "/v2/models/iris/versions/stable/drift")
    assert status == 400 and "by number" in body["error"] and "'stable'" in body["error"]
    status, body = _get(gateway, "/v2/models/iris/versions/1/drift?window=2d")
    assert status == 400 and "window must be one of" in body["error"]


def test_the_example_alert_rules_fire_on_act_and_never_on_too_few_samples(
    gateway: RunningGateway, client: tc.InferenceServerClient, tmp_path: Path,
) -> None:
    shifted = load_iris().data.copy()
    shifted[:, 2] += 3 * shifted[:, 2].std()
    _send(client, "iris_alert", "features", shifted, "1")
    _send(client, "iris_few", "features", load_iris().data[::10], "2")  # 15 rows: too few
    assert _report(gateway, "iris_alert", 1, len(shifted))["summary"]["bands"]["act"] > 0
    assert _report(gateway, "iris_few", 2, 15)["summary"]["bands"]["insufficient"] > 0
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as answer:
        exposition = answer.read().decode()
    bands = [s for f in text_string_to_metric_families(exposition)
             if f.name == "modelgate_drift_features" for s in f.samples]
    acting = sorted({(s.labels["model"], s.labels["version"]) for s in bands
                     if s.labels["status"] == "act" and s.value > 0})
    assert ("iris_alert", "1") in acting and ("iris_few", "2") not in acting
    # The scraped band series, held for 30 minutes, through the rules as Prometheus runs them.
    series = [{"series": "modelgate_drift_features{" + ",".join(
        f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}", "values": f"{s.value:g}x30"}
        for s in bands]
    expected = [{"exp_labels": {"severity": "warning", "model": m, "version": v},
                 "exp_annotations": {
                     "summary": f"{m} v{v}: drift, act ({_act_count(bands, m, v)} feature(s))",
                     "description": f"Run: modelgate drift {m} --version {v}"}}
                for m, v in acting]
    tests = tmp_path / "drift_alerts_test.yml"
    tests.write_text(json.dumps({  # JSON is YAML too
        "rule_files": [str(ALERTS)], "evaluation_interval": "1m",
        "tests": [{"interval": "1m", "input_series": series, "alert_rule_test": [
            {"eval_time": "20m", "alertname": "ModelInputDriftAct", "exp_alerts": expected},
            {"eval_time": "20m", "alertname": "ModelInputDriftWatch", "exp_alerts": []}]}]}))
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.fail("promtool is not on PATH: run scripts/install_test_deps.sh")
    result = subprocess.run([promtool, "test", "rules", str(tests)], capture_output=True,
                            text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def _act_count(samples: list[Any], model: str, version: str) -> str:
    return next(f"{s.value:g}" for s in samples if s.labels == {
        "model": model, "version": version, "status": "act"})
