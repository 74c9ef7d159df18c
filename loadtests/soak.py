"""Soak run, on demand (minutes; not part of CI): steady closed-loop load through
``modelgate serve`` with tenants, Redis-shared quotas and 100 % tracing, reporting errors,
the gateway's memory and p99 latency per interval, as JSON and a PNG plot."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from loadtests.overload import percentiles
from loadtests.probes import rss_kib
from loadtests.requests import request_for
from loadtests.servers import redis_process, served_gateway
from loadtests.tenant_admin import tenants
from loadtests.tracing_bench import span_sink
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

MODELS = ("iris", "digits", "species")


@dataclass
class Interval:
    """One reporting interval: seconds since the start, answers by code, latencies."""

    t_s: float
    codes: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)
    rss_mib: float = 0.0

    def row(self) -> dict[str, object]:
        p50, p99 = percentiles(self.latencies_ms)
        ok = self.codes.get("OK", 0)
        return {"t_s": round(self.t_s, 1), "ok": ok,
                "errors": sum(self.codes.values()) - ok, "codes": self.codes,
                "p50_ms": p50, "p99_ms": p99, "rss_mib": round(self.rss_mib, 1)}


def tenants_file(folder: Path, count: int) -> tuple[Path, list[str]]:
    """``count`` tenants with limits well above the offered load: a soak expects no errors,
    yet every request is charged to real buckets, a concurrency set and a daily count."""
    path = folder / "tenants.toml"
    keys: list[str] = []

    for index in range(count):
        name = f"soak{index}"
        tenants(path, "create", name, "--models", *MODELS, "--requests-per-s", "100000",
            "--rows-per-s", "1000000", "--concurrent", "256", "--requests-per-day", "1000000000")
        keys.append(tenants(path, "issue-key", name).splitlines()[0])
    return path, keys


async def soak(target: str, pid: int, keys: Sequence[str], *, concurrency: int,
               duration_s: float, interval_s: float) -> list[Interval]:
    intervals: list[Interval] = []
    start = time.perf_counter()
    current = Interval(0.0)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        auth = (("authorization", f"Bearer {keys[0]}"),)
        requests = [
            request_for(await stub.ModelMetadata(pb.ModelMetadataRequest(name=m), metadata=auth))
            for m in MODELS
        ]
        end = start + duration_s

        async def caller(index: int) -> None:
            metadata = (("authorization", f"Bearer {keys[index % len(keys)]}"),)
            sequence = index
            while time.perf_counter() < end:
                request = requests[sequence % len(requests)]
                sequence += 1
                began = time.perf_counter()
                try:
                    await stub.ModelInfer(request, metadata=metadata, timeout=10)
                    code = "OK"
                except grpc.RpcError as exc:
                    code = exc.code().name
                current.codes[code] = current.codes.get(code, 0) + 1
                current.latencies_ms.append((time.perf_counter() - began) * 1000)

        async def reporter() -> None:
            nonlocal current
            while time.perf_counter() < end:
                await asyncio.sleep(interval_s)
                done, current = current, Interval(time.perf_counter() - start)
                done.t_s = time.perf_counter() - start
                done.rss_mib = rss_kib(pid) / 1024
                intervals.append(done)
                row = done.row()
                print(f"t={row['t_s']:>7}s ok={row['ok']:>6} errors={row['errors']:>3} "
                      f"p99={row['p99_ms']} ms rss={row['rss_mib']} MiB", flush=True)

        await asyncio.gather(reporter(), *(caller(i) for i in range(concurrency)))
    return intervals


def plot(intervals: Sequence[Interval], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    rows = [i.row() for i in intervals]
    minutes = [float(str(r["t_s"])) / 60 for r in rows]
    figure, axes = plt.subplots(3, 1, figsize=(9, 8), sharex=True)
    series = (("errors", "errors per interval"), ("rss_mib", "gateway RSS (MiB)"),
              ("p99_ms", "p99 latency (ms)"))
    for axis, (key, label) in zip(axes, series, strict=True):
        axis.plot(minutes, [r[key] or 0 for r in rows], marker=".")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    axes[-1].set_xlabel("minutes")
    figure.suptitle("modelgate soak: tenants, Redis quotas, 100 % tracing")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.soak", description=__doc__)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--interval-s", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--tenants", type=int, default=4)
    parser.add_argument("--sampling", type=float, default=1.0, help="trace sampling ratio")
    parser.add_argument("--png", type=Path, default=Path("soak.png"))
    parser.add_argument("--json", type=Path, default=Path("soak.json"))
    args = parser.parse_args(argv)
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        path, keys = tenants_file(folder, args.tenants)
        extra = ["--tenants", str(path), "--trace-sampling-ratio", str(args.sampling)]
        if shutil.which("redis-server"):
            extra += ["--redis-url", stack.enter_context(redis_process())]
        else:
            print("redis-server not found: quotas in-process", file=sys.stderr)
        endpoint, sink = stack.enter_context(span_sink())
        extra += ["--otlp-endpoint", endpoint]
        target, pid = stack.enter_context(served_gateway(None, extra))
        intervals = asyncio.run(soak(target, pid, keys, concurrency=args.concurrency,
                                     duration_s=args.minutes * 60,
                                     interval_s=args.interval_s))
    rows = [i.row() for i in intervals]
    errors = sum(int(str(r["errors"])) for r in rows)
    settled = rows[min(1, len(rows) - 1)]["rss_mib"] if rows else 0.0
    growth = float(str(rows[-1]["rss_mib"])) - float(str(settled)) if rows else 0.0
    summary = {"intervals": rows, "errors": errors, "rss_growth_mib": round(growth, 1),
               "spans_exported": sink.spans, "settings": vars(args)}
    args.json.write_text(json.dumps(summary, indent=2, default=str))
    plot(intervals, args.png)
    print(f"errors: {errors}; memory growth after the first interval: {growth:.1f} MiB; "
          f"spans exported: {sink.spans}; plot: {args.png}")
    return 0 if errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
