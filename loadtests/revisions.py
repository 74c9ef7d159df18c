"""The gateway at two or more git revisions side by side: each served in turn from its own
worktree (``modelgate serve``, the batched MLP), driven by h2load on loopback, rounds
alternated.

    .venv/bin/python -m loadtests.revisions BASE [LATER ...] [--rounds 4] [--json out.json]

With one revision named, the later one is this checkout as it stands, named by its commit
(with ``+`` if it has changes). A revision followed by ``+FLAG`` (``.+--inline-compute-us=0``)
is served with that ``modelgate serve`` flag, so one revision can be set against itself
with other settings; ``--tree NAME=PATH`` serves a directory as it is (built extensions
included).

Alternating rounds of the two revisions in one run is what makes them comparable: on a
small machine the same revision's figures drift by several percent between runs. Each
round reports answers/s, the process's CPU per answer, the event-loop thread's share of it
(from /proc), the mean latency and the mean batch (the gateway's own counters), at each
level; the table gives each revision's median."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loadtests import h2load
from loadtests.peer_models import peer_models, write_store
from loadtests.requests import answered_request
from loadtests.runner import machine
from loadtests.servers import cpu_seconds, scrape, start_gateway
from loadtests.thread_cpu import spent, thread_times

ROOT = Path(__file__).resolve().parents[1]
MODEL = "mlp"
# name: (connections, streams per connection)
LEVELS = {"c=1": (1, 1), "c=4": (4, 1), "c=8": (4, 2), "c=32": (4, 8)}
DEFAULT_LEVELS = ("c=1", "c=32")
MODELS = ("mlp", "mlp_unbatched")


@dataclass(frozen=True)
class Entry:
    """One thing served: a git revision (or a directory served as it is), with flags."""

    name: str
    revision: str | None
    flags: tuple[str, ...] = ()
    path: Path | None = None


def entry(text: str) -> Entry:
    """``REVISION[+FLAG...]``: a revision and the serve flags it runs with."""
    revision, *flags = text.split("+")
    if not revision or any(not flag.startswith("--") for flag in flags):
        raise ValueError(f"{text!r}: a revision, then any number of +--flag[=value]")
    return Entry(text, revision, tuple(flags))


@dataclass(frozen=True)
class Round:
    """One revision's figures at one level in one round."""

    revision: str
    level: str
    round: int
    answers_per_s: float
    cpu_us: float  # the whole serving process, per answer
    loop_us: float  # its main (event-loop) thread, per answer
    loop_sleeps: float  # times that thread went to sleep, per answer
    mean_latency_us: float
    mean_batch: float = 0.0  # rows per model execution (the gateway's counters; 0: unread)


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout.strip()


@contextlib.contextmanager
def worktrees(revisions: Sequence[str]) -> Iterator[dict[str, Path]]:
    """A detached worktree per revision (``.`` is this checkout as it stands), removed after."""
    with tempfile.TemporaryDirectory(prefix="modelgate-revisions-") as folder:
        trees: dict[str, Path] = {}
        try:
            for revision in dict.fromkeys(revisions):
                if revision == ".":
                    trees[revision] = ROOT
                    continue
                tree = Path(folder) / _git("rev-parse", "--short", revision)
                _git("worktree", "add", "--detach", str(tree), revision)
                trees[revision] = tree
            yield trees
        finally:
            for tree in trees.values():
                if tree != ROOT:
                    _git("worktree", "remove", "--force", str(tree))


def measure(revision: str, tree: Path, store: Path, round_: int, *, levels: Sequence[str],
            duration_s: float, warmup_s: float, flags: Sequence[str] = (),
            model: str = MODEL) -> list[Round]:
    """One round of ``revision``: a fresh server, then each level in turn."""
    rounds = []
    with start_gateway(store, flags, source=tree) as served:
        body = h2load.body_for(answered_request(served.target, model))
        for level in levels:
            connections, streams = LEVELS[level]
            if warmup_s:
                h2load.run_h2load(served.target, body, connections=connections,
                                  streams=streams, duration_s=warmup_s, warmup_s=0)
            counted = scrape(served.metrics_port)
            threads, cpu = thread_times(served.pid), cpu_seconds(served.pid)
            run = h2load.run_h2load(served.target, body, connections=connections,
                                    streams=streams, duration_s=duration_s, warmup_s=0)
            cpu = cpu_seconds(served.pid) - cpu
            loop = spent(threads, thread_times(served.pid)).get(served.pid)
            after = scrape(served.metrics_port)
            batches = (after.since(counted) if after and counted else None)
            mean_batch = (batches.rows[model] / batches.batches[model]
                          if batches and batches.batches[model] else 0.0)
            if run.http_errors or run.done == 0:
                raise RuntimeError(f"{revision} at {level}: {dict(run.http_errors)} "
                                   f"in {run.done} answers")
            latencies = run.latencies_s or [0.0]
            rounds.append(Round(revision, level, round_, run.done / duration_s,
                                cpu / run.done * 1e6,
                                (loop.cpu_ns / 1e3 / run.done) if loop else 0.0,
                                (loop.sleeps / run.done) if loop else 0.0,
                                statistics.fmean(latencies) * 1e6, mean_batch))
    return rounds


def run(entries: Sequence[Entry], rounds: int, *, levels: Sequence[str], duration_s: float,
        warmup_s: float, model: str = MODEL) -> list[Round]:
    results: list[Round] = []
    revisions = [e.revision for e in entries if e.revision is not None]
    with tempfile.TemporaryDirectory(prefix="modelgate-revisions-store-") as folder, \
            worktrees(revisions) as trees:
        store = write_store(Path(folder) / "store", peer_models())
        for round_ in range(rounds):
            # Alternate the order, so no revision always follows the same other one.
            order = list(entries) if round_ % 2 == 0 else list(entries)[::-1]
            for served in order:
                tree = served.path if served.revision is None else trees[served.revision]
                assert tree is not None
                found = measure(served.name, tree, store, round_, levels=levels,
                                duration_s=duration_s, warmup_s=warmup_s, flags=served.flags,
                                model=model)
                results += found
                print(" ".join(f"{r.revision} r{r.round} {r.level}: {r.answers_per_s:,.0f}/s "
                               f"{r.cpu_us:.0f} us cpu, {r.loop_us:.0f} us loop"
                               for r in found), flush=True)
    return results


def _median(rows: Sequence[Round], field: str) -> float:
    return statistics.median(float(getattr(r, field)) for r in rows)


def table(results: Sequence[Round], revisions: Sequence[str]) -> str:
    """Each revision's medians per level, its range of answers/s, and the last one's over
    the first one's."""
    base, last = revisions[0], revisions[-1]
    lines = ["| level | figure | " + " | ".join(revisions) + " | ratio |",
             "|---|---|" + "---:|" * (len(revisions) + 1)]
    for level in dict.fromkeys(r.level for r in results):
        by = {rev: [r for r in results if r.level == level and r.revision == rev]
              for rev in revisions}
        for field, name in (("answers_per_s", "answers/s"), ("cpu_us", "CPU µs/answer"),
                            ("loop_us", "loop-thread CPU µs/answer"),
                            ("loop_sleeps", "loop-thread sleeps/answer"),
                            ("mean_latency_us", "mean latency µs"),
                            ("mean_batch", "rows per model execution")):
            medians = {rev: _median(rows, field) for rev, rows in by.items()}
            digits = 2 if field in ("loop_sleeps", "mean_batch") else 0
            cells = [f"{medians[rev]:,.{digits}f}" + (
                f" ({min(r.answers_per_s for r in by[rev]):,.0f}-"
                f"{max(r.answers_per_s for r in by[rev]):,.0f})"
                if field == "answers_per_s" else "") for rev in revisions]
            ratio = medians[last] / medians[base] if medians[base] else 0.0
            lines.append(f"| {level} | {name} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        paired = _paired(by[base], by[last])
        if paired:
            lines.append(f"| {level} | answers/s, {last} over {base} in the same round "
                         f"(median, range) | " + " | ".join("" for _ in revisions)
                         + f" | {statistics.median(paired):.2f} "
                         f"({min(paired):.2f}-{max(paired):.2f}) |")
    return "\n".join(lines)


def _paired(first: Sequence[Round], last: Sequence[Round]) -> list[float]:
    """Each round's ratio of the two revisions' answers/s: measured minutes apart, so the
    machine's drift between runs mostly cancels."""
    earlier = {r.round: r.answers_per_s for r in first}
    return [r.answers_per_s / earlier[r.round] for r in last
            if earlier.get(r.round)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.revisions", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("revisions", nargs="*", metavar="REVISION",
                        help="git revisions, earliest first, each with any +--flag[=value] "
                             "to serve it with; '.' is this checkout as it stands, and is "
                             "the later one when only one is named")
    parser.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                        help="also serve this directory as it is (after the revisions)")
    parser.add_argument("--model", choices=MODELS, default=MODEL, help="the model driven")
    parser.add_argument("--rounds", type=int, default=4, help="alternated rounds per revision")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds measured per level")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before each level")
    parser.add_argument("--levels", default=",".join(DEFAULT_LEVELS),
                        help=f"comma-separated, of {', '.join(LEVELS)}")
    parser.add_argument("--json", type=Path, help="also write every round here")
    args = parser.parse_args(argv)
    if not (1 <= args.rounds <= 20 and 0 < args.duration <= 60 and 0 <= args.warmup <= 30):
        parser.error("--rounds lies in [1, 20], --duration in (0, 60], --warmup in [0, 30]")
    levels = args.levels.split(",")
    if not set(levels) <= set(LEVELS):
        parser.error(f"--levels takes {', '.join(LEVELS)}")
    if h2load.binary() is None:
        parser.error("h2load not found (scripts/install_test_deps.sh installs nghttp2-client)")
    named = list(dict.fromkeys(args.revisions))
    if len(named) == 1 and not args.tree:
        named.append(".")
    try:
        entries = [entry(text) for text in named]
        for text in args.tree:
            name, _, path = text.partition("=")
            if not name or not Path(path).is_dir():
                raise ValueError(f"--tree {text!r}: NAME=PATH of a directory")
            entries.append(Entry(name, None, (), Path(path).resolve()))
    except ValueError as exc:
        parser.error(str(exc))
    if not 2 <= len(entries) <= 6:
        parser.error("2 to 6 revisions and trees at once")
    results = run(entries, args.rounds, levels=levels, duration_s=args.duration,
                  warmup_s=args.warmup, model=args.model)
    names = [e.name for e in entries]
    if any(e.revision == "." for e in entries):
        # This checkout is named by its commit, marked if it has changes.
        here = _git("rev-parse", "--short", "HEAD") + ("+" if _git("status", "--porcelain")
                                                        else "")
        renamed = {e.name: here + e.name[1:] for e in entries if e.revision == "."}
        results = [replace(r, revision=renamed.get(r.revision, r.revision)) for r in results]
        names = [renamed.get(name, name) for name in names]
    where = machine()
    where["command"] = " ".join([".venv/bin/python -m loadtests.revisions",
                                 *(sys.argv[1:] if argv is None else argv)])
    print(f"\n{where['cpu_model']}, {where['cpus']} cores, load average "
          f"{where['load_average']}: `{where['command']}`\n")
    print(table(results, names))
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": where, "rounds": [asdict(r) for r in results]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
