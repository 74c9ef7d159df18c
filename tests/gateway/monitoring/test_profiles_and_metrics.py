"""Profiles (schema checks, freezing a live window), the metrics' feature-cardinality cap,
the hand-off that drops rather than waits, and merging several workers' reports."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_iris

from gateway.monitoring.collector import DriftCollector
from gateway.monitoring.endpoint import DriftEndpoint, merge_reports
from gateway.monitoring.profile import ProfileError, dumps, load, parse
from gateway.monitoring.reference import build_profile, profile_from_report
from gateway.monitoring.report import version_report
from gateway.process.cli import main
from gateway.process.metrics_fanin import merge_expositions
from gateway.settings import demo_store
from tests.gateway.monitoring.synthetic import (
    every_sample,
    reference_rows,
    send,
    version,
    write_profile,
)


def test_a_profile_round_trips_through_its_json(tmp_path: Path) -> None:
    x, label, scores = reference_rows(np.random.default_rng(1), 1000)
    profile = build_profile({"x": x}, {"label": label, "scores": scores}, source="s")
    (tmp_path / "profile.json").write_text(dumps(profile), encoding="utf-8")
    assert load(tmp_path / "profile.json") == profile
    assert profile.tensor("scores", "output") is not None
    assert profile.tensor("scores", "output").probability  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(schema="other/9"), "schema must be"),
        (lambda d: d["tensors"][0].update(role="middle"), "tensors[0].role"),
        (lambda d: d["tensors"][0]["features"][0].update(cuts=[2.0, 1.0]), "strictly increasing"),
        (lambda d: d["tensors"][0]["features"][0]["reference"].update(counts=[1.0]),
         "1 counts for"),
        (lambda d: d["tensors"][0]["features"][0]["reference"].update(count=-3), "whole number"),
        (lambda d: d["tensors"].append(d["tensors"][0]), "appears twice"),
    ],
)
def test_a_bad_profile_is_refused_naming_the_field(mutate: object, message: str) -> None:
    x, label, _ = reference_rows(np.random.default_rng(1), 200)
    data = json.loads(dumps(build_profile({"x": x}, {"label": label})))
    mutate(data)  # type: ignore[operator]
    with pytest.raises(ProfileError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse(data)


def test_a_corrupt_profile_leaves_the_version_without_reference_but_monitored(
    tmp_path: Path,
) -> None:
    served = version(tmp_path)
    (tmp_path / "1" / "profile.json").write_text('{"schema": "modelgate.profile/1", "tens',
                                                 encoding="utf-8")
    monitor = every_sample()
    send(monitor, served, *reference_rows(np.random.default_rng(2), 300))
    report = version_report(monitor, "m", 1, "all")
    assert report is not None
    assert report["reference"]["kind"] == "none"
    assert "profile.json" in report["reference"]["reason"]
    assert "not JSON" in report["reference"]["reason"]
    assert report["window"]["rows"] == 300  # its statistics go on


def test_freezing_a_live_window_gives_a_profile_that_window_matches(tmp_path: Path) -> None:
    monitor = every_sample()
    rng = np.random.default_rng(3)
    send(monitor, version(tmp_path), *reference_rows(rng, 3000))
    endpoint = DriftEndpoint(monitor)
    status, report = endpoint.answer("/v2/models/m/versions/1/drift", "window=all")  # type: ignore[misc]
    assert status == 200
    frozen = profile_from_report(json.loads(json.dumps(report)), source="live")
    assert frozen.rows == 3000 and frozen.has_reference
    (tmp_path / "1" / "profile.json").write_text(dumps(frozen), encoding="utf-8")
    again = every_sample()
    send(again, version(tmp_path), *reference_rows(rng, 3000))
    result = version_report(again, "m", 1, "all")
    assert result is not None and result["reference"]["kind"] == "profile"
    assert result["summary"]["scored"] == result["summary"]["features"]
    assert result["summary"]["psi_max"] < 0.05


def test_the_metrics_export_at_most_top_k_features_of_10000(tmp_path: Path) -> None:
    features = 10_000
    served = version(tmp_path, features=features)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, features)).astype(np.float32)
    label, scores = np.zeros((1000, 1), np.int64), np.full((1000, 3), 1 / 3, np.float32)
    profile = build_profile({"x": x}, {"label": label, "scores": scores})
    (tmp_path / "1" / "profile.json").write_text(dumps(profile), encoding="utf-8")
    live = rng.normal(size=(200, features)).astype(np.float32)
    live[:, 17] += 5.0
    monitor = every_sample(top_features=25)
    send(monitor, served, live, label[:200], scores[:200], batch=50)
    registry = CollectorRegistry()
    registry.register(DriftCollector(monitor))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    drift = families["modelgate_drift"].samples
    assert {s.labels["method"] for s in drift} == {"psi", "js", "ks"}
    exported = {s.labels["feature"] for s in drift}
    assert len(exported) == 25
    assert "x[17]" in exported  # the one that drifts is among the top
    maximum = {s.labels["method"]: s.value for s in families["modelgate_drift_max"].samples}
    psi_17 = next(s.value for s in drift if s.labels["feature"] == "x[17]"
                  and s.labels["method"] == "psi")
    assert maximum["psi"] == pytest.approx(psi_17)
    counts = {s.labels["status"]: s.value for s in families["modelgate_drift_features"].samples}
    # x[...] plus label and scores[0..2]; no scores.top1: label is that class on every row
    assert counts["all"] == features + 4


def test_a_full_hand_off_drops_the_sample_and_counts_it(tmp_path: Path) -> None:
    monitor = every_sample(queue_size=3)
    served = version(tmp_path)
    x, label, _ = reference_rows(np.random.default_rng(5), 10)
    taken = [monitor.offer(served, {"x": x[i:i + 1]}, {"label": label[i:i + 1]}, 1)
             for i in range(10)]
    assert taken == [True] * 3 + [False] * 7
    gate = monitor.gates()[0]
    assert (gate.taken, gate.dropped_full) == (3, 7)
    assert monitor.drain() == 3
    assert monitor.offer(served, {"x": x[:1]}, {"label": label[:1]}, 1)


def test_the_rows_per_second_cap_drops_and_counts(tmp_path: Path) -> None:
    monitor = every_sample(max_rows_per_s=100)
    served = version(tmp_path)
    x, label, _ = reference_rows(np.random.default_rng(6), 64)
    results = [monitor.offer(served, {"x": x}, {"label": label}, 64) for _ in range(5)]
    assert results[0] and not all(results)
    assert monitor.gates()[0].dropped_rate >= 1


def test_sampling_takes_one_in_n_per_version(tmp_path: Path) -> None:
    monitor = every_sample(sample_every=10)
    one, two = version(tmp_path, 1), version(tmp_path, 2)
    x, label, _ = reference_rows(np.random.default_rng(7), 1)
    for _ in range(50):  # alternating versions: each still gets 1 in 10 of its own
        monitor.offer(one, {"x": x}, {"label": label}, 1)
        monitor.offer(two, {"x": x}, {"label": label}, 1)
    assert [g.taken for g in monitor.gates()] == [5, 5]


def test_a_reloaded_versions_sample_series_starts_again_as_the_only_one(
        tmp_path: Path) -> None:
    # A reload (a new profile.json, new files) serves the same id from a new ServedVersion.
    monitor = every_sample()
    before, after = version(tmp_path, 1), version(tmp_path, 1)
    x, label, _ = reference_rows(np.random.default_rng(9), 1)
    for _ in range(3):
        monitor.offer(before, {"x": x}, {"label": label}, 1)
    monitor.offer(after, {"x": x}, {"label": label}, 1)  # before any sample is folded in
    registry = CollectorRegistry()
    registry.register(DriftCollector(monitor))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    taken = [s for s in families["modelgate_drift_samples"].samples
             if s.name == "modelgate_drift_samples_total"]
    # Its statistics start again (docs/monitoring.md), its counters with them: one series.
    assert [(s.labels["version"], s.value) for s in taken] == [("1", 1.0)]


def test_excluded_models_are_not_sampled(tmp_path: Path) -> None:
    monitor = every_sample(exclude=frozenset({"m"}))
    x, label, _ = reference_rows(np.random.default_rng(8), 1)
    assert not monitor.offer(version(tmp_path), {"x": x}, {"label": label}, 1)
    assert monitor.queued() == 0


def test_workers_reports_merge_into_the_report_of_all_their_rows(tmp_path: Path) -> None:
    write_profile(tmp_path, 1, np.random.default_rng(9))
    x, label, scores = reference_rows(np.random.default_rng(10), 2000)
    x[:, 1] += 2.0
    halves = [every_sample(), every_sample()]
    send(halves[0], version(tmp_path), x[:1000], label[:1000], scores[:1000])
    send(halves[1], version(tmp_path), x[1000:], label[1000:], scores[1000:])
    whole = every_sample()
    send(whole, version(tmp_path), x, label, scores)
    parts = [version_report(m, "m", 1, "all") for m in halves]
    merged = merge_reports([p for p in parts if p is not None])
    expected = version_report(whole, "m", 1, "all")
    assert expected is not None
    by_name = {f["name"]: f for f in merged["features"]}
    for feature in expected["features"]:
        mine = by_name[feature["name"]]
        assert mine["live"]["counts"] == feature["live"]["counts"]
        assert mine["psi"] == pytest.approx(feature["psi"])
        if feature["type"] == "numeric":
            assert mine["live"]["mean"] == pytest.approx(feature["live"]["mean"])
            assert mine["live"]["std"] == pytest.approx(feature["live"]["std"])
    assert merged["summary"]["worst"] == "x[1]"
    assert merged["samples"]["taken"] == sum(p["samples"]["taken"] for p in parts if p)
    assert merged["window"]["rows"] == expected["window"]["rows"] == 2000


def test_profile_names_features_by_the_npz_then_the_configs_class_labels(
        tmp_path: Path) -> None:
    shutil.copytree(demo_store() / "iris", tmp_path / "iris")
    config = tmp_path / "iris" / "config.pbtxt"
    config.write_text(config.read_text(encoding="utf-8").replace(
        'name: "probabilities"', 'name: "probabilities"\n    label_filename: "species.txt"'),
        encoding="utf-8")
    (tmp_path / "iris" / "species.txt").write_text("setosa\nversicolor\nvirginica\n",
                                                   encoding="utf-8")
    data = tmp_path / "iris.npz"
    columns = np.array(["sepal_length", "sepal_width", "petal_length", "petal_width"])
    np.savez(data, **{"features": load_iris().data, "features.names": columns})
    assert main(["profile", "iris", "1", "--store", str(tmp_path), "--data", str(data),
                 "--force"]) == 0
    profile = load(tmp_path / "iris" / "1" / "profile.json")
    names = {t.name: [f.name for f in (*t.numeric, *t.categorical)] for t in profile.tensors}
    assert names["features"] == list(columns)
    assert names["probabilities"] == [
        "probabilities[setosa]", "probabilities[versicolor]", "probabilities[virginica]"]
    assert names["label"] == ["label"]  # the top-1 class on every row: no probabilities.top1


def test_the_supervisor_keeps_the_worst_workers_band_counts() -> None:
    def worker(act: int) -> str:
        return "".join(
            f'modelgate_drift_features{{model="m",version="1",status="{status}"}} {value}\n'
            for status, value in (("all", 9), ("act", act), ("ok", 9 - act)))

    merged = merge_expositions([worker(0), worker(2)]).decode()
    counts = {s.labels["status"]: s.value for f in text_string_to_metric_families(merged)
              for s in f.samples}
    assert counts == {"all": 9.0, "act": 2.0, "ok": 9.0}
