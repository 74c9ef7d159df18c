"""The targets suite works end to end at tiny durations against the real gateway (not how
fast anything is): its Markdown, JSON and PNG, the targets' arithmetic, the progress bar."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from loadtests import benchmark
from loadtests.measurements import BASELINE, NOOP, CostRun, Measurements
from loadtests.progress import Progress
from loadtests.results import LevelResult, format_errors
from loadtests.targets import evaluate, format_targets

pytestmark = pytest.mark.timeout(600)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny run of every phase: 1 and 2 workers, both drivers, ceilings, costs."""
    out = tmp_path_factory.mktemp("targets")
    code = benchmark.main([
        "--suite", "targets", "--out", str(out), "--quick", "--duration", "0.3",
        "--warmup", "0.1", "--ceiling-seconds", "0.05", "--concurrency", "1,4",
        "--target-concurrency", "4", "--open-fractions", "0.5", "--cnn-rows", "4",
        "--cnn-concurrency", "2", "--ceiling-rows", "1,8", "--workers", "1,2",
        "--h2load", "yes", "--channels", "2",
    ])
    assert code == 0
    return out


def test_the_suite_writes_markdown_json_and_png(report: Path) -> None:
    assert (report / "benchmark.png").read_bytes().startswith(PNG_SIGNATURE)
    data = json.loads((report / "benchmark.json").read_text())
    assert {"command", "machine", "config", "targets", "levels", "ort_rows_per_s",
            "ort_latency_us", "costs", "cost_method", "checks", "notes"} <= set(data)
    for level in data["levels"] + data["costs"]:
        assert {"model", "mode", "load", "driver", "workers", "requests", "requests_per_s",
                "rows_per_s", "p50_ms", "p90_ms", "p99_ms", "p99.9_ms", "errors"} <= set(level)
        assert level["requests"] > 0 and level["errors"] == {}, level
    drivers = {(lv["model"], lv["driver"], lv["workers"]) for lv in data["levels"]}
    for workers in (1, 2):
        for driver in ("python", "h2load"):
            assert ("digits", driver, workers) in drivers
            assert (NOOP, driver, workers) in drivers
    assert ("cnn", "python", 1) in drivers
    assert set(data["ort_rows_per_s"]) == {"digits", "cnn"}
    assert data["ort_latency_us"]["digits"]["p50"] > 0
    variants = [c["variant"] for c in data["costs"] if c["driver"] == "python"]
    # A/B/A: a baseline run before, between and after the variants.
    assert set(variants[::2]) == {BASELINE}
    assert variants[1::2] == ["in-process quotas", "Redis quotas", "tracing 1 %",
                             "monitoring on (default sampling)"]
    names = [t["name"] for t in data["targets"]]
    assert any("vs the no-op server, 2 workers, h2load" in n for n in names)
    assert any(n.startswith("cnn rows/s") for n in names)
    assert any("p50 - ONNX Runtime call p50" in n for n in names)
    assert sum("throughput vs none" in n for n in names) == 8  # 4 variants, 2 drivers
    assert all(t["met"] in (True, False, None) for t in data["targets"])


def test_the_markdown_has_every_table(report: Path) -> None:
    text = (report / "benchmark.md").read_text()
    for heading in ("## Targets", "## Load levels", "## Ceilings",
                    "## Cost of quotas and tracing", "## Checks and notes"):
        assert heading in text
    assert "--suite targets" in text and "p99.9 ms" in text
    level_rows = [line for line in text.splitlines() if line.startswith(("| digits |",
                                                                          "| cnn |"))]
    assert any("| 1 conc |" in r and "| python |" in r for r in level_rows)
    assert any("req/s offered (50 % of its closed-loop peak)" in r for r in level_rows)
    assert any("| h2load | 2 |" in r for r in level_rows)
    targets = text.split("## Targets")[1].split("##")[0]
    assert targets.count("\n| ") >= 8 and ("| yes |" in targets or "| **no** |" in targets)


def _level(model: str, load: float, requests: int, *, driver: str = "python",
           workers: int = 1, rows: int = 1, latency_s: float = 0.001) -> LevelResult:
    return LevelResult(model, "closed", load, rows, 1.0, [latency_s] * requests,
                       driver=driver, workers=workers)


def test_targets_are_judged_from_the_measurements() -> None:
    m = Measurements(config={}, machine={})
    m.levels = [
        _level("digits", 32, 750), _level(NOOP, 32, 1000),
        _level("digits_unbatched", 1, 10, latency_s=0.0004),
        _level("digits", 1, 10, latency_s=0.0009), _level(NOOP, 1, 10, latency_s=0.0002),
        _level("cnn", 4, 50, rows=16),
    ]
    m.ort_rows_per_s = {"cnn": {8: 900.0, 32: 1000.0}}
    m.ort_latency_us = {"digits": {"p50": 100.0}}
    m.costs = [CostRun(BASELINE, 1, _level("digits", 32, 1000)),
               CostRun("tracing 1 %", 2, _level("digits", 32, 850)),
               CostRun(BASELINE, 3, _level("digits", 32, 980)),
               CostRun("tracing 1 %", 4, _level("digits", 32, 891)),
               CostRun(BASELINE, 5, _level("digits", 32, 1000))]
    by_name = {t.name: t for t in evaluate(m)}
    ceiling = by_name["digits at 32 concurrent requests vs the no-op server, 1 worker, "
                      "python client"]
    assert ceiling.measured == pytest.approx(75.0) and ceiling.met is True
    cnn = by_name["cnn rows/s vs in-process ONNX Runtime's best, python client"]
    assert cnn.measured == pytest.approx(80.0) and cnn.met is True  # 800 of 1000 rows/s
    latency = by_name["concurrency 1: digits_unbatched p50 - ONNX Runtime call p50, "
                      "python client"]
    assert latency.measured == pytest.approx(300.0) and latency.met is False
    own = next(t for n, t in by_name.items() if "what the gateway adds" in n)
    assert own.measured == pytest.approx(100.0) and own.met is None
    floor = next(t for n, t in by_name.items() if "transport floor" in n)
    assert floor.measured == pytest.approx(200.0)
    tracing = by_name["tracing 1 %: throughput vs none, python client"]
    # Each run over the mean of the baselines either side: 850 / 990 and 891 / 990.
    assert tracing.measured == pytest.approx(100 * (850 + 891) / 2 / 990)
    assert tracing.met is False
    table = format_targets(list(by_name.values()))
    assert "| 75.0 % | ≥ 70 % | yes |" in table and "| 300 µs | ≤ 250 µs | **no** |" in table


def test_errors_are_shown_by_status_code() -> None:
    assert format_errors({}) == "0"
    assert format_errors({"UNAVAILABLE": 1, "RESOURCE_EXHAUSTED": 3, "OK": 0}) == (
        "RESOURCE_EXHAUSTED 3, UNAVAILABLE 1"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_bar_reports_each_step() -> None:
    plain = io.StringIO()
    progress = Progress(2.0, plain)
    with progress.step("first level", 1.0):
        pass
    with progress.step("second level", 1.0):
        assert progress.fraction() >= 0.5
    assert progress.fraction() == 1.0
    lines = plain.getvalue().splitlines()
    assert lines == ["[  0%] first level (1 s)", "[ 50%] second level (1 s)"]
    terminal = _Terminal()
    live = Progress(1.0, terminal)
    with live.step("level", 1.0):
        line = live.line()
    assert line.startswith("[") and "level" in line and "left" in line
    assert terminal.getvalue().endswith("\r\x1b[K")  # cleared for the next printed row
