"""The two-revision comparison: its table's medians and ratios, and one short real run of
``modelgate serve`` from a worktree of HEAD and from this checkout under h2load, whose
worktree is gone afterwards. Needs git and h2load; no figure's size is asserted."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from loadtests import revisions
from loadtests.revisions import DEFAULT_LEVELS, LEVELS, Entry, Round, entry, table

pytestmark = pytest.mark.timeout(300)


def _worktrees() -> list[str]:
    listed = subprocess.run(["git", "worktree", "list", "--porcelain"], cwd=revisions.ROOT,
                            capture_output=True, text=True, check=True).stdout
    return [line for line in listed.splitlines() if line.startswith("worktree ")]


def test_the_table_gives_each_revisions_median_and_the_later_over_the_earlier() -> None:
    rows = [Round(rev, level, n, rate, 100.0 * k, 80.0 * k, 0.5 * k, 1000.0)
            for level in LEVELS
            for rev, k, rates in (("a", 1, (900.0, 1000.0, 5000.0)), ("b", 2, (1800, 2000, 10)))
            for n, rate in enumerate(rates)]
    text = table(rows, ["a", "b"])
    assert "| c=32 | answers/s | 1,000 (900-5,000) | 1,800 (10-2,000) | 1.80 |" in text
    assert "| c=1 | CPU µs/answer | 100 | 200 | 2.00 |" in text
    assert "| c=1 | loop-thread CPU µs/answer | 80 | 160 | 2.00 |" in text
    assert "| c=1 | loop-thread sleeps/answer | 0.50 | 1.00 | 2.00 |" in text
    assert text.count("| mean latency µs | 1,000 | 1,000 | 1.00 |") == len(LEVELS)
    assert text.count("| rows per model execution | 0.00 | 0.00 | 0.00 |") == len(LEVELS)
    # Round by round: 1800/900, 2000/1000 and 10/5000.
    assert ("| c=32 | answers/s, b over a in the same round (median, range) |  |  "
            "| 2.00 (0.00-2.00) |") in text


def test_a_revision_may_carry_the_flags_it_is_served_with() -> None:
    assert entry("HEAD~2") == Entry("HEAD~2", "HEAD~2")
    assert entry(".+--inline-compute-us=0+--event-loop=asyncio") == Entry(
        ".+--inline-compute-us=0+--event-loop=asyncio", ".",
        ("--inline-compute-us=0", "--event-loop=asyncio"))
    for bad in ("+--workers=2", ".+workers=2"):
        with pytest.raises(ValueError, match="a revision, then"):
            entry(bad)


def test_a_short_run_serves_both_revisions_and_removes_its_worktree(tmp_path: Path) -> None:
    before = _worktrees()
    out = tmp_path / "revisions.json"
    # This checkout with a flag beside HEAD: both the worktree and the flag path run.
    code = revisions.main(["HEAD", ".+--inline-compute-us=0", "--rounds", "1", "--duration",
                           "1", "--warmup", "0", "--json", str(out)])
    assert code == 0
    assert _worktrees() == before
    report = json.loads(out.read_text())
    seen = {(r["revision"], r["level"]) for r in report["rounds"]}
    names = sorted({r["revision"] for r in report["rounds"]})
    assert len(names) == 2 and "HEAD" in names
    assert next(n for n in names if n != "HEAD").endswith("+--inline-compute-us=0")
    assert seen == {(name, level) for name in names for level in DEFAULT_LEVELS}
    for row in report["rounds"]:
        assert row["answers_per_s"] > 0 and row["cpu_us"] > 0 and row["loop_us"] > 0
        assert row["mean_batch"] >= 1  # the batched MLP: at least a row per execution
    assert report["machine"]["command"].startswith(".venv/bin/python -m loadtests.revisions")
