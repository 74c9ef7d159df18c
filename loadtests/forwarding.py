"""The forwarding path against its ceiling, side by side in one run: Triton alone, the no-op
proxy in front of it (loadtests/noop_proxy.py: bytes through, nothing parsed) and modelgate
forwarding to it (``--triton``), on the batched MLP, under h2load on loopback.

    .venv/bin/python -m loadtests.forwarding [--duration 5] [--json forwarding.json]

Each path in turn: the mean and p50 latency at concurrency 1, then answers/s and the middle
process's CPU per request at 32 (4 connections of 8 streams). Two targets are checked: the
gateway adds at most 400 µs to Triton's own mean at concurrency 1, and at 32 its CPU per
request is at most 1.3x the no-op proxy's. Needs h2load and the Triton install
(scripts/install_test_deps.sh)."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import grpc

from loadtests import h2load
from loadtests.drivers import percentile
from loadtests.noop_proxy import start_noop_proxy
from loadtests.peer_models import peer_models, write_triton_repository
from loadtests.requests import answered_request
from loadtests.runner import machine
from loadtests.servers import cpu_seconds, free_port, start_gateway
from loadtests.versus import triton
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

MODEL = "mlp"
TRITON, PROXY, GATEWAY = "Triton", "no-op proxy -> Triton", "modelgate -> Triton"
LEVELS = {"c=1": (1, 1), "c=32": (4, 8)}  # name: (connections, streams per connection)
ADDED_US, CPU_RATIO = 400.0, 1.3  # the targets


@dataclass(frozen=True)
class Row:
    """One path at one level. ``cpu_us``: the middle process's CPU per request (0 for Triton
    alone, which has none)."""

    path: str
    level: str
    answers_per_s: float
    mean_us: float
    p50_us: float
    cpu_us: float


def _answered(target: str, request: pb.ModelInferRequest) -> None:
    """One ModelInfer answered without error (h2load cannot tell a gRPC error)."""
    with grpc.insecure_channel(target) as channel:
        pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=30)


def measure(path: str, target: str, pid: int | None, body: bytes, *, duration_s: float,
            warmup_s: float) -> list[Row]:
    rows = []
    for level, (connections, streams) in LEVELS.items():
        if warmup_s:
            h2load.run_h2load(target, body, connections=connections, streams=streams,
                              duration_s=warmup_s, warmup_s=0)
        cpu = cpu_seconds(pid) if pid else 0.0
        run = h2load.run_h2load(target, body, connections=connections, streams=streams,
                                duration_s=duration_s, warmup_s=0)
        cpu = cpu_seconds(pid) - cpu if pid else 0.0
        if run.http_errors or not run.latencies_s:
            raise RuntimeError(f"{path} at {level}: {dict(run.http_errors)} in {run.done}")
        latencies = sorted(run.latencies_s)
        rows.append(Row(path, level, run.done / duration_s,
                        statistics.fmean(latencies) * 1e6, percentile(latencies, 50) * 1e6,
                        cpu / run.done * 1e6))
        print(f"{path}, {level}: {rows[-1].answers_per_s:,.0f}/s, mean "
              f"{rows[-1].mean_us:,.0f} us, CPU {rows[-1].cpu_us:,.0f} us", flush=True)
    return rows


def run(duration_s: float, warmup_s: float) -> list[Row]:
    """Triton, then the proxy, then the gateway, each in front of the same tritonserver."""
    with tempfile.TemporaryDirectory(prefix="modelgate-forwarding-") as folder:
        tmp = Path(folder)
        repository = write_triton_repository(tmp / "repo", peer_models())
        (tmp / "empty").mkdir()
        with triton(repository, tmp) as (upstream, _):
            request = answered_request(upstream, MODEL)
            body = h2load.body_for(request)
            rows = measure(TRITON, upstream, None, body, duration_s=duration_s,
                           warmup_s=warmup_s)
            with start_noop_proxy(free_port(), upstream) as proxy:
                _answered(proxy.target, request)
                rows += measure(PROXY, proxy.target, proxy.pid, body, duration_s=duration_s,
                                warmup_s=warmup_s)
            with start_gateway(tmp / "empty", ["--triton", f"up={upstream},export=all"]) as gw:
                _answered(gw.target, request)
                rows += measure(GATEWAY, gw.target, gw.pid, body, duration_s=duration_s,
                                warmup_s=warmup_s)
    return rows


def targets(rows: Sequence[Row]) -> list[tuple[str, str, bool]]:
    """(target, what was measured, met) for the two forwarding targets."""
    at = {(r.path, r.level): r for r in rows}
    added = at[GATEWAY, "c=1"].mean_us - at[TRITON, "c=1"].mean_us
    proxy_added = at[PROXY, "c=1"].mean_us - at[TRITON, "c=1"].mean_us
    ratio = at[GATEWAY, "c=32"].cpu_us / at[PROXY, "c=32"].cpu_us
    return [
        (f"c=1: at most {ADDED_US:.0f} µs added to Triton's mean",
         f"{added:+,.0f} µs (the no-op proxy: {proxy_added:+,.0f} µs)", added <= ADDED_US),
        (f"c=32: CPU per request at most {CPU_RATIO}x the no-op proxy's",
         f"{ratio:.2f}x ({at[GATEWAY, 'c=32'].cpu_us:,.0f} against "
         f"{at[PROXY, 'c=32'].cpu_us:,.0f} µs)", ratio <= CPU_RATIO),
    ]


def table(rows: Sequence[Row]) -> str:
    lines = ["| path | level | answers/s | mean µs | p50 µs | CPU µs per request |",
             "|---|---|---:|---:|---:|---:|"]
    lines += [f"| {r.path} | {r.level} | {r.answers_per_s:,.0f} | {r.mean_us:,.0f} | "
              f"{r.p50_us:,.0f} | {f'{r.cpu_us:,.0f}' if r.path != TRITON else '-'} |"
              for r in rows]
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    lines += [f"| {name} | {got} | {'yes' if met else 'no'} |" for name, got, met in targets(rows)]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.forwarding", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=5.0, help="seconds measured a level")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds before each level")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    if not (0 < args.duration <= 60 and 0 <= args.warmup <= 30):
        parser.error("--duration lies in (0, 60], --warmup in [0, 30]")
    if h2load.binary() is None:
        parser.error("h2load not found (scripts/install_test_deps.sh installs nghttp2-client)")
    rows = run(args.duration, args.warmup)
    where = machine()
    where["command"] = " ".join([".venv/bin/python -m loadtests.forwarding",
                                 *(sys.argv[1:] if argv is None else argv)])
    print(f"\n{where['cpu_model']}, {where['cpus']} cores, commit {where['commit']}, load "
          f"average {where['load_average']}: `{where['command']}`\n")
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": where, "rows": [asdict(r) for r in rows],
            "targets": [{"target": n, "measured": g, "met": m} for n, g, m in targets(rows)],
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
