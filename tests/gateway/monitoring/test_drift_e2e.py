"""Drift end to end: the real gateway over real gRPC, the demo store's digits and iris with
their profiles; shifted requests show in the JSON report, on /metrics and in
``modelgate drift``; a corrupt profile and a full sampling queue cost no request."""

from __future__ import annotations

import json
import shutil
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

from gateway.monitoring.monitor import QUEUE_SIZE
from gateway.process.cli import main
from gateway.settings import demo_store
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.models import add_constant, add_model_config, write_model
from tests.support.waiting import wait_until

SHIFTED = 10  # the pixel the shifted digits requests saturate


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store")
    for name in ("digits", "iris"):
        shutil.copytree(demo_store() / name, root / name)
    (root / "iris" / "routing.toml").write_text("[labels]\nstable = 1\ncanary = 2\n",
                                                encoding="utf-8")
    folder = write_model(root, "adder", 1, add_constant(1.0), add_model_config("adder"))
    (folder / "profile.json").write_text('{"schema": "modelgate.profile/1", "tensors": [{',
                                         encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store, monitoring_sample_every=1, monitoring_max_rows_per_s=0) as gw:
        yield gw


def _infer(client: tc.InferenceServerClient, model: str, name: str, rows: np.ndarray,
           version: str = "") -> tc.InferResult:
    tensor = tc.InferInput(name, list(rows.shape), "FP32")
    tensor.set_data_from_numpy(rows.astype(np.float32))
    return client.infer(model, [tensor], model_version=version)


def _get(gateway: RunningGateway, path: str) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}{path}"
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def _report(gateway: RunningGateway, model: str, version: int, rows: int) -> dict[str, Any]:
    path = f"/v2/models/{model}/versions/{version}/drift?window=5m"

    def ready() -> bool:
        status, body = _get(gateway, path)
        return status == 200 and json.loads(body)["window"]["rows"] >= rows

    wait_until(ready, f"{rows} rows of {model}/{version} in the drift report")
    return json.loads(_get(gateway, path)[1])  # type: ignore[no-any-return]


def test_shifted_digits_show_in_the_json_metrics_and_cli(
    gateway: RunningGateway, client: tc.InferenceServerClient,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pixels = (load_digits().data / 16.0)[:480]
    pixels[:, SHIFTED] = 1.0
    for start in range(0, len(pixels), 8):
        _infer(client, "digits", "pixels", pixels[start:start + 8])
    report = _report(gateway, "digits", 1, len(pixels))
    assert report["reference"]["kind"] == "profile"
    assert report["reference"]["rows"] == 1797
    worst = report["features"][0]
    assert worst["name"] == f"pixels[{SHIFTED}]" and worst["psi"] > 0.25
    others = [f["psi"] for f in report["features"] if f["role"] == "input"
              and f["name"] != worst["name"] and f["psi"] is not None]
    assert len(others) == 63 and np.median(others) < 0.1
    assert report["samples"]["taken"] == 60

    status, body = _get(gateway, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    psi = {s.labels["feature"]: s.value for s in families["modelgate_drift"].samples
           if s.labels["model"] == "digits" and s.labels["method"] == "psi"}
    assert psi[f"pixels[{SHIFTED}]"] == pytest.approx(worst["psi"], rel=0.05)
    assert len(psi) <= 20
    taken = {(s.labels["model"], s.labels["version"]): s.value
             for s in families["modelgate_drift_samples"].samples
             if s.name == "modelgate_drift_samples_total"}
    assert taken[("digits", "1")] >= 60

    url = f"http://127.0.0.1:{gateway.gateway.metrics_port}"
    assert main(["drift", "digits", "--version", "1", "--url", url]) == 0
    table = capsys.readouterr().out
    line = next(t for t in table.splitlines() if t.strip().startswith(f"pixels[{SHIFTED}]"))
    assert " act " in f" {line} "
    assert "reference profile" in table


def test_canary_and_stable_are_compared_on_their_outputs(
    gateway: RunningGateway, client: tc.InferenceServerClient,
) -> None:
    features = load_iris().data
    for label in ("stable", "canary"):
        for start in range(0, len(features), 10):
            _infer(client, "iris", "features", features[start:start + 10], version=label)
    report = _report(gateway, "iris", 2, len(features))
    comparison = next(c for c in report["comparisons"] if c["relation"] == "canary vs stable")
    assert (comparison["version"], comparison["other_version"]) == (2, 1)
    scored = {f["name"]: f for f in comparison["features"]}
    # The label output is the top-1 class on every reference row: shown once, as label.
    assert "label" in scored and "probabilities.top1" not in scored
    assert sum(scored["label"]["counts"]) == sum(scored["label"]["other_counts"]) == 150
    # Both versions were trained on these rows: their predicted classes nearly agree.
    assert scored["label"]["psi"] < 0.1


def test_a_corrupt_profile_reports_no_reference_while_the_version_serves(
    gateway: RunningGateway, client: tc.InferenceServerClient,
) -> None:
    rows = np.ones((4, 4), dtype=np.float32)
    for _ in range(30):
        answer = _infer(client, "adder", "x", rows)
        np.testing.assert_array_equal(answer.as_numpy("y"), rows + 1.0)
    report = _report(gateway, "adder", 1, 120)
    assert report["reference"]["kind"] == "none"
    assert "profile.json" in report["reference"]["reason"]
    assert report["summary"]["scored"] == 0


def test_unknown_paths_and_windows_get_clear_answers(gateway: RunningGateway) -> None:
    status, body = _get(gateway, "/v2/models/nothing/versions/1/drift")
    assert status == 404 and b"unknown model 'nothing'" in body
    status, body = _get(gateway, "/v2/models/digits/versions/1/drift?window=2d")
    assert status == 400 and b"window must be one of" in body
    assert _get(gateway, "/v2/models/digits/stats")[0] == 404


def test_a_full_sampling_queue_drops_samples_and_loses_no_request(
    gateway: RunningGateway, client: tc.InferenceServerClient,
) -> None:
    monitor = gateway.gateway.monitor
    rows = np.ones((1, 4), dtype=np.float32)
    sent = QUEUE_SIZE * 2
    with monitor.lock:  # the worker stalls at its next fold: the queue fills up
        for _ in range(sent):
            answer = _infer(client, "adder", "x", rows)
            np.testing.assert_array_equal(answer.as_numpy("y"), rows + 1.0)
    gate = next(g for g in monitor.gates() if g.version.id.name == "adder")
    assert gate.dropped_full > 0
    wait_until(lambda: monitor.queued() == 0, "the worker catching up")
    report = _report(gateway, "adder", 1, 0)
    assert report["samples"]["dropped_queue_full"] == gate.dropped_full
