"""The in-process hot-path tool runs the real gateway's ModelInfer handler: its answers are
real (the rows it reports were inferred), with and without tenants."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from loadtests import hotpath
from loadtests.quota_bench import tenants_file


def test_it_measures_the_real_handler(capsys: pytest.CaptureFixture[str]) -> None:
    assert hotpath.main(["--requests", "64", "--concurrency", "8", "--rounds", "1",
                         "--profile", "5"]) == 0
    out = capsys.readouterr().out
    line = re.search(r"digits, 8 callers: ([\d.]+) µs of loop CPU a request.*mean batch ([\d.]+)",
                     out)
    assert line is not None, out
    assert float(line.group(1)) > 0 and float(line.group(2)) >= 1
    assert "tottime" in out  # the profile


def test_it_authenticates_and_charges_with_a_tenants_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = tenants_file(tmp_path, ["--requests-per-s", "1000000", "--concurrent", "100"])
    assert hotpath.main(["--requests", "32", "--concurrency", "4", "--rounds", "1",
                         "--tenants", str(path), "--key", key]) == 0
    assert "digits, 4 callers" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="UNAUTHENTICATED"):
        hotpath.main(["--requests", "4", "--concurrency", "1", "--rounds", "1",
                      "--tenants", str(path), "--key", key + "x"])
