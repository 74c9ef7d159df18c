"""Drift scores on synthetic data: reference draws score low, a one-standard-deviation shift
of one feature scores high on that feature only, class balance changes show, NaNs count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gateway.monitoring.accumulator import TensorTracker
from gateway.monitoring.divergence import js_distance, ks, psi
from gateway.monitoring.profile import NumericFeature, TensorProfile
from gateway.monitoring.report import version_report
from tests.gateway.monitoring.synthetic import (
    every_sample,
    reference_rows,
    send,
    version,
    write_profile,
)

LIVE_ROWS = 4000


def _scores(report: dict[str, object]) -> dict[str, float]:
    features = report["features"]
    assert isinstance(features, list)
    return {f["name"]: f["psi"] for f in features}


@pytest.fixture
def profiled(tmp_path: Path) -> Path:
    write_profile(tmp_path, 1, np.random.default_rng(1))
    return tmp_path


def test_divergences_of_equal_and_disjoint_histograms() -> None:
    assert psi([10, 20, 30], [10, 20, 30]) == pytest.approx(0.0)
    assert js_distance([10, 20, 30], [20, 40, 60]) < 0.01  # equal shares; smoothing only
    assert ks([1, 0], [0, 1]) == pytest.approx(1.0)
    assert psi([100, 0], [0, 100]) > 5  # smoothed: large and finite
    assert 0.9 < js_distance([1000, 0], [0, 1000]) <= 1.0


def test_data_from_the_reference_scores_below_005(profiled: Path) -> None:
    monitor = every_sample()
    send(monitor, version(profiled), *reference_rows(np.random.default_rng(2), LIVE_ROWS))
    report = version_report(monitor, "m", 1, "5m")
    assert report is not None
    assert report["reference"]["kind"] == "profile"
    scores = _scores(report)
    assert set(scores) == {"x[0]", "x[1]", "x[2]", "x[3]", "label", "scores[0]", "scores[1]",
                           "scores[2]", "scores.top1"}
    assert all(value is not None and value < 0.05 for value in scores.values()), scores
    assert report["summary"]["psi_max"] < 0.05


def test_one_feature_shifted_by_one_std_stands_out_alone(profiled: Path) -> None:
    monitor = every_sample()
    x, label, scores = reference_rows(np.random.default_rng(3), LIVE_ROWS)
    x[:, 2] += 3.0  # feature 2 has standard deviation 3
    send(monitor, version(profiled), x, label, scores)
    report = version_report(monitor, "m", 1, "5m")
    assert report is not None
    psis = _scores(report)
    assert psis["x[2]"] > 0.25
    assert all(value < 0.1 for name, value in psis.items() if name != "x[2]"), psis
    assert report["features"][0]["name"] == "x[2]"  # worst first
    assert report["summary"]["worst"] == "x[2]"
    shifted = report["features"][0]
    assert shifted["live"]["mean"] == pytest.approx(3.0, abs=0.3)
    assert shifted["reference"]["mean"] == pytest.approx(0.0, abs=0.1)


def test_a_class_balance_change_shows_in_the_output_distribution(profiled: Path) -> None:
    monitor = every_sample()
    send(monitor, version(profiled),
         *reference_rows(np.random.default_rng(4), LIVE_ROWS, classes=(0.8, 0.1, 0.1)))
    report = version_report(monitor, "m", 1, "5m")
    assert report is not None
    label = next(f for f in report["features"] if f["name"] == "label")
    assert label["type"] == "categorical" and label["categories"] == ["0", "1", "2"]
    assert label["psi"] > 0.25
    shares = np.array(label["live"]["counts"]) / label["live"]["count"]
    assert shares[0] == pytest.approx(0.8, abs=0.03)
    assert all(v < 0.1 for k, v in _scores(report).items() if k.startswith("x")), report


def test_nans_and_infinities_are_counted_not_binned(profiled: Path) -> None:
    monitor = every_sample()
    x, label, scores = reference_rows(np.random.default_rng(5), 400)
    x[:37, 1] = np.nan
    x[40:45, 1] = np.inf
    x[50, 3] = -np.inf
    send(monitor, version(profiled), x, label, scores)
    report = version_report(monitor, "m", 1, "all")
    assert report is not None
    by_name = {f["name"]: f["live"] for f in report["features"]}
    assert (by_name["x[1]"]["nan"], by_name["x[1]"]["inf"]) == (37, 5)
    assert by_name["x[1]"]["count"] == 400 - 42
    assert sum(by_name["x[1]"]["counts"]) == 400 - 42
    assert (by_name["x[3]"]["nan"], by_name["x[3]"]["inf"]) == (0, 1)
    assert np.isfinite(by_name["x[1]"]["mean"])


def test_a_version_without_profile_is_measured_against_the_previous_versions_window(
    profiled: Path,
) -> None:
    monitor = every_sample()
    rng = np.random.default_rng(6)
    send(monitor, version(profiled, 1), *reference_rows(rng, LIVE_ROWS))
    x, label, scores = reference_rows(rng, LIVE_ROWS)
    x[:, 0] += 1.0
    send(monitor, version(profiled, 2), x, label, scores)
    report = version_report(monitor, "m", 2, "5m")
    assert report is not None
    assert report["reference"]["kind"] == "version"
    assert "version 1" in report["reference"]["source"]
    psis = _scores(report)
    assert psis["x[0]"] > 0.25
    assert all(v < 0.1 for k, v in psis.items() if k != "x[0]"), psis


def test_no_profile_and_no_earlier_version_still_gets_statistics(tmp_path: Path) -> None:
    monitor = every_sample()
    send(monitor, version(tmp_path), *reference_rows(np.random.default_rng(7), 500))
    report = version_report(monitor, "m", 1, "all")
    assert report is not None
    assert report["reference"]["kind"] == "none"
    assert "no profile.json" in report["reference"]["reason"]
    x0 = next(f for f in report["features"] if f["name"] == "x[0]")
    assert x0["live"]["count"] == 500 and x0["psi"] is None
    assert len(x0["cuts"]) >= 5  # bins fixed from the first rows
    assert "scores.top1" in {f["name"] for f in report["features"]}  # labels are random


def test_bins_from_traffic_leave_out_a_top1_that_the_label_output_already_is(
        tmp_path: Path) -> None:
    monitor = every_sample()
    x, _, scores = reference_rows(np.random.default_rng(10), 200)
    label = scores.argmax(axis=1).reshape(-1, 1).astype(np.int64)
    send(monitor, version(tmp_path), x, label, scores)
    report = version_report(monitor, "m", 1, "all")
    assert report is not None
    names = {f["name"] for f in report["features"]}
    assert "label" in names and "scores[0]" in names and "scores.top1" not in names


def test_values_a_few_ulps_past_a_cut_count_where_the_reference_put_them() -> None:
    tracker = TensorTracker(TensorProfile("p", "output", "numeric", "columns",
                                          (NumericFeature("p[0]", (0.0, 1.0)),)))
    stats = tracker.empty()
    one = np.float32(1.0)
    values = [np.nextafter(one, np.float32(2.0)), one, np.float32(1.001), np.float32(-5.0),
              np.float32(1e30)]
    tracker.update(stats, np.array(values, dtype=np.float32).reshape(-1, 1))
    # 1.0000001 is on the cut 1.0 (bin 1); 1.001 is past it; the outer bins are open-ended.
    assert list(stats.hist[0]) == [1.0, 2.0, 2.0]
