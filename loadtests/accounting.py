"""The gateway's CPU per request, accounted for through the real server: ``modelgate serve``
and the no-op grpc.aio server driven by h2load on loopback; each thread's CPU per request
from /proc; the event-loop thread split by a py-spy profile into the request path's stages
and the native transport, with the closure of that split against the thread's measured time.

    .venv/bin/python -m loadtests.accounting [--concurrency 1,32] [--json accounting.json]

Each level runs h2load for a fixed time: a warm-up, a plain window (per-thread CPU, no
profiler attached) and a profiled window (py-spy, native stacks, the loop thread's samples
by bucket). Needs h2load and py-spy, and ptrace rights over the server (root here)."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from loadtests import h2load
from loadtests.accounting_report import Account, table
from loadtests.noop_server import start_noop
from loadtests.peer_models import peer_models, write_store
from loadtests.requests import answered_request
from loadtests.runner import machine
from loadtests.servers import free_port, scrape, start_gateway
from loadtests.stage_profile import BUCKETS, IDLE, LoopProfile, record
from loadtests.thread_cpu import ThreadTime, by_group, spent, thread_times
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

GATEWAY, NOOP = "modelgate", "no-op grpc.aio"
LOOP = "event loop"


@dataclass(frozen=True)
class Plan:
    concurrency: tuple[int, ...] = (1, 32)
    models: tuple[str, ...] = ("mlp",)
    kinds: tuple[str, ...] = ("unary",)
    warmup_s: float = 2.0
    plain_s: float = 5.0
    profile_s: float = 16.0
    # py-spy samples per second: each stops the server for a millisecond or more (native
    # stacks of every thread), so a low rate over a long window disturbs it least.
    rate: int = 25
    messages: int = 4  # per h2load stream body, for the stream kind


@dataclass(frozen=True)
class Level:
    server: str
    target: str
    pid: int
    metrics_port: int | None
    model: str
    kind: str
    concurrency: int


def _ended_in(ended_s: list[float], start: float, end: float) -> int:
    return sum(1 for t in ended_s if start <= t < end)


def account(level: Level, window: tuple[float, float], answered: tuple[int, int],
            times: tuple[dict[int, ThreadTime], dict[int, ThreadTime]],
            profile: LoopProfile) -> Account:
    """A level's figures from its two windows: (plain, profiled) seconds and answers, the
    threads' times spent in each, and the profiled window's loop samples."""
    (plain_s, profiled_s), (plain_n, profiled_n), (plain, profiled) = window, answered, times
    if not plain_n or not profiled_n:
        raise RuntimeError(f"{level.server} {level.model}: no answer in a window "
                           f"({plain_n}, {profiled_n})")
    names = {**profile.thread_names, level.pid: LOOP}
    threads = {group: (ns / plain_n / 1e3, count)
               for group, (ns, count) in sorted(by_group(plain, names).items())}
    loop = profiled[level.pid]
    cpu_us, waiting_us = loop.cpu_ns / profiled_n / 1e3, loop.waiting_ns / profiled_n / 1e3
    wall_us = profiled_s / profiled_n * 1e6
    busy_us = (1.0 - profile.share(IDLE)) * wall_us
    # A sample cannot tell running from waiting for a core: the busy samples stand for
    # both, so each bucket's share of them is scaled to the CPU the thread had.
    running = cpu_us / (cpu_us + waiting_us) if cpu_us + waiting_us else 0.0
    # py-spy finds the thread in a system call far more often than it is in one (it stops
    # the process with ptrace), so the samples in the kernel stand for the system time the
    # kernel counted for the thread, and the others for its user time.
    ticks = loop.user_ns + loop.system_ns
    kernel_share = loop.system_ns / ticks if ticks else None
    split = profile.busy_split(kernel_share)
    stages = {b: split[b] * busy_us * running for b in BUCKETS}
    weight = profile.user_sample_weight(kernel_share)
    hottest = [(name, n * weight * busy_us * running)
               for name, n in profile.functions.most_common(12)]
    return Account(
        level.server, level.model, level.kind, level.concurrency, plain_n / plain_s,
        profiled_n / profiled_s, threads, cpu_us, waiting_us, plain[level.pid].sleeps / plain_n,
        stages, sum(stages.values()),
        busy_us / (cpu_us + waiting_us) if cpu_us + waiting_us else 0.0, profile.samples,
        profile.share(IDLE), profile.errors, hottest=hottest,
        kernel_sampled=profile.kernel_share, kernel_measured=kernel_share)


def measure(level: Level, body: bytes, plan: Plan) -> Account:
    """One level: h2load runs through a warm-up, the plain window and the profiled window
    (py-spy attached to the server), each window's answers counted from h2load's log."""
    connections = min(4, level.concurrency)
    streams = max(1, level.concurrency // connections)
    stream = level.kind == "stream"
    per = plan.messages if stream else 1
    # py-spy takes a moment to attach and to write its file: the run outlasts both.
    length = plan.warmup_s + plan.plain_s + plan.profile_s + 8.0
    runs: list[h2load.H2loadRun] = []
    failures: list[BaseException] = []

    def drive() -> None:
        try:
            runs.append(h2load.run_h2load(
                level.target, body, connections=connections, streams=streams,
                duration_s=length, warmup_s=0,
                path=h2load.STREAM_PATH if stream else h2load.PATH))
        except BaseException as exc:  # reported by the caller's thread
            failures.append(exc)

    counters = scrape(level.metrics_port) if level.metrics_port else None
    driver = threading.Thread(target=drive, name="h2load")
    driver.start()
    try:
        time.sleep(plan.warmup_s)  # the windows are times on the clock, not events
        t0, s0 = time.time(), thread_times(level.pid)
        time.sleep(plan.plain_s)
        t1, s1 = time.time(), thread_times(level.pid)
        profile = record(level.pid, level.pid, plan.profile_s, plan.rate)
        t2, s2 = time.time(), thread_times(level.pid)
    finally:
        driver.join(length + 90)
    if failures:
        raise RuntimeError(f"h2load failed on {level.server}") from failures[0]
    run = runs[0]
    if not run.ended_s or max(run.ended_s) < t2:
        raise RuntimeError("h2load ended before the profiled window did")
    figures = account(
        level, (t1 - t0, t2 - t1),
        (_ended_in(run.ended_s, t0, t1) * per, _ended_in(run.ended_s, t1, t2) * per),
        (spent(s0, s1), spent(s1, s2)), profile)
    figures.errors = dict(run.http_errors)
    if counters is not None and level.metrics_port:
        after = scrape(level.metrics_port)
        if after is not None:
            figures.errors.update(after.since(counters).errors(level.model))
            # h2load resets what is in flight when its time is up: CANCELLED, not an error.
            if figures.errors.get("CANCELLED", 0) <= connections * streams * per:
                figures.errors.pop("CANCELLED", None)
    return figures


def _body(request: pb.ModelInferRequest, kind: str, plan: Plan) -> bytes:
    if kind == "stream":
        return h2load.stream_body_for(request, plan.messages)
    return h2load.body_for(request)


@contextlib.contextmanager
def _store() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="modelgate-accounting-") as folder:
        yield write_store(Path(folder) / "store", peer_models())


def run(plan: Plan) -> list[Account]:
    """The gateway's levels, then the no-op server's (fed the gateway's own answer bytes),
    one server at a time."""
    accounts: list[Account] = []
    with _store() as store, start_gateway(store) as gw:
        requests = {model: answered_request(gw.target, model) for model in plan.models}
        with grpc.insecure_channel(gw.target) as channel:
            answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
                requests[plan.models[0]], timeout=30).SerializeToString()
        for model in plan.models:
            for kind in plan.kinds:
                for concurrency in plan.concurrency:
                    level = Level(GATEWAY, gw.target, gw.pid, gw.metrics_port, model, kind,
                                  concurrency)
                    accounts.append(measure(level, _body(requests[model], kind, plan), plan))
                    print(accounts[-1].label, flush=True)
    with start_noop(free_port(), answer) as noop:
        for kind in plan.kinds:
            for concurrency in plan.concurrency:
                level = Level(NOOP, noop.target, noop.pid, None, plan.models[0], kind,
                              concurrency)
                body = _body(requests[plan.models[0]], kind, plan)
                accounts.append(measure(level, body, plan))
                print(accounts[-1].label, flush=True)
    return accounts


def _numbers(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(","))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.accounting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=_numbers, default=(1, 32),
                        help="concurrent requests per level, comma-separated")
    parser.add_argument("--models", default="mlp", help="peer models (mlp, mlp_unbatched, cnn)")
    parser.add_argument("--kinds", default="unary", help="unary, stream or both")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds before measuring")
    parser.add_argument("--plain", type=float, default=5.0, help="seconds of per-thread CPU")
    parser.add_argument("--profile", type=float, default=16.0, help="seconds of py-spy")
    parser.add_argument("--rate", type=int, default=25, help="py-spy samples per second")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    kinds = tuple(args.kinds.split(","))
    if not set(kinds) <= {"unary", "stream"} or not all(0 < c <= 256 for c in args.concurrency):
        parser.error("--kinds takes unary and stream; --concurrency lies in [1, 256]")
    if not (0 <= args.warmup <= 30 and 0 < args.plain <= 60 and 1 <= args.profile <= 60):
        parser.error("--warmup lies in [0, 30], --plain in (0, 60], --profile in [1, 60]")
    if h2load.binary() is None:
        parser.error("h2load not found (scripts/install_test_deps.sh installs nghttp2-client)")
    plan = Plan(args.concurrency, tuple(args.models.split(",")), kinds, args.warmup,
                args.plain, args.profile, args.rate)
    accounts = run(plan)
    where = machine()
    where["command"] = " ".join([".venv/bin/python -m loadtests.accounting",
                                 *(sys.argv[1:] if argv is None else argv)])
    print(table(accounts, where))
    if args.json:
        args.json.write_text(json.dumps(
            {"machine": where, "levels": [{**asdict(a), "closes": a.closes} for a in accounts]},
            indent=1))
    return 0 if all(a.closes for a in accounts) else 1


if __name__ == "__main__":
    raise SystemExit(main())
