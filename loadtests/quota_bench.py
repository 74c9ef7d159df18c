"""The throughput cost of tenants and quotas: the same closed-loop load against ``modelgate
serve`` open, with a key but no limits, with limits in-process, and with limits in Redis.

    .venv/bin/python -m loadtests.quota_bench --model iris --concurrency 16 --duration 5
    .venv/bin/python -m loadtests.quota_bench --only open,redis+concurrent --rounds 3
    .venv/bin/python -m loadtests.quota_bench --micro 20000   # the quota path alone"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc

from gateway.quota.redis_store import RedisQuotaStore
from gateway.quota.store import Limits, LocalQuotaStore, QuotaStore, Scope
from gateway.settings import demo_store
from loadtests.drivers import closed_loop
from loadtests.requests import request_for
from loadtests.results import LevelResult
from loadtests.servers import cpu_seconds, redis_process, start_gateway
from loadtests.tenant_admin import tenants
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc

# Limits far above what the load reaches: every request is charged, none is rejected.
HIGH = ["--requests-per-s", "1000000", "--burst", "1000000", "--rows-per-s", "100000000",
        "--requests-per-day", "1000000000"]
# (name for --only, label, tenant flags or None for an open gateway, uses Redis)
MODES: tuple[tuple[str, str, list[str] | None, bool], ...] = (
    ("open", "open (no tenants)", None, False),
    ("key", "key, no limits", [], False),
    ("local", "in-process limits", HIGH, False),
    ("local+concurrent", "in-process + concurrent", [*HIGH, "--concurrent", "100000"], False),
    ("redis", "redis limits (leased)", HIGH, True),
    ("redis+concurrent", "redis + concurrent", [*HIGH, "--concurrent", "100000"], True),
)


class _WithKey(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds the API key to every call, as a client library would."""

    def __init__(self, key: str) -> None:
        self._metadata = (("authorization", f"Bearer {key}"),)

    async def intercept_unary_unary(
        self, continuation: Callable[[Any, Any], Awaitable[Any]], details: Any, request: Any
    ) -> Any:
        details = details._replace(metadata=tuple(details.metadata or ()) + self._metadata)
        return await continuation(details, request)


def tenants_file(folder: Path, flags: Sequence[str]) -> tuple[Path, str]:
    """A tenants file with one tenant, ``bench``, allowed every model, with ``flags`` (as
    ``modelgate tenants create`` takes them); returns it and the tenant's API key."""
    path = folder / "tenants.toml"
    path.unlink(missing_ok=True)

    tenants(path, "create", "bench", "--models", "*", *flags)
    return path, tenants(path, "issue-key", "bench").splitlines()[0]


async def _measure(target: str, pid: int, key: str | None, model: str, *, concurrency: int,
                   duration_s: float, warmup_s: float, rows: int) -> LevelResult:
    interceptors: Any = [_WithKey(key)] if key else None
    channels = [grpc.aio.insecure_channel(target, interceptors=interceptors) for _ in range(4)]
    try:
        stubs = [pb_grpc.GRPCInferenceServiceStub(c) for c in channels]
        metadata = await stubs[0].ModelMetadata(pb.ModelMetadataRequest(name=model))
        request = request_for(metadata, batch=rows)
        # Warm-up apart, so the server's CPU time covers the measured window alone: CPU per
        # request is the figure that survives a machine shared with other work.
        await closed_loop(stubs, request, concurrency, duration_s=warmup_s, warmup_s=0)
        cpu = cpu_seconds(pid)
        window = await closed_loop(stubs, request, concurrency, duration_s=duration_s,
                                   warmup_s=0)
        return LevelResult(model, "closed", concurrency, rows, duration_s, window.latencies,
                           dict(window.errors), server_cpu_s=cpu_seconds(pid) - cpu)
    finally:
        for channel in channels:
            await channel.close(None)


def run(model: str, *, concurrency: int, duration_s: float, warmup_s: float, rows: int,
        store: Path, redis_url: str | None, only: Sequence[str] = (),
        rounds: int = 1) -> list[dict[str, object]]:
    """Each chosen mode once per round, in turn: rounds interleave the modes, so drift of
    a shared machine's speed shows in all of them alike."""
    rows_out: list[dict[str, object]] = []
    modes = [mode for mode in MODES if not only or mode[0] in only]
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(redis_process())
        for index, (_, label, flags, uses_redis) in itertools.product(range(rounds), modes):
            extra: list[str] = []
            key = None
            if flags is not None:
                path, key = tenants_file(Path(tmp), flags)
                extra += ["--tenants", str(path)]
            if uses_redis:
                extra += ["--redis-url", url]
            with start_gateway(store, extra) as served:
                result = asyncio.run(_measure(
                    served.target, served.pid, key, model, concurrency=concurrency,
                    duration_s=duration_s, warmup_s=warmup_s, rows=rows,
                ))
            summary = result.summary()
            cpu_us = (result.server_cpu_s or 0.0) / max(1, result.requests) * 1e6
            rows_out.append({"quotas": label, "round": index + 1, **summary,
                             "server_cpu_us_per_request": round(cpu_us)})
            print(_row(rows_out[-1]), flush=True)
    return rows_out


async def _admit_loop(store: QuotaStore, scopes: tuple[Scope, ...], count: int) -> float:
    await store.start()
    try:
        for _ in range(min(count, 1000)):  # warm-up: connections, script load, leases
            async with store.admit(scopes, 1):
                pass
        began = time.perf_counter()
        for _ in range(count):
            async with store.admit(scopes, 1):
                pass
        return time.perf_counter() - began
    finally:
        await store.close()


def micro(count: int, redis_url: str | None) -> list[dict[str, object]]:
    """The quota path alone, no gRPC: microseconds per admitted request, per store."""
    rates = Limits(requests_per_s=1e6, burst=10**6, rows_per_s=1e8, requests_per_day=10**9)
    with_slots = Limits(**dict(rates.items()), concurrent=10**5)
    out: list[dict[str, object]] = []
    with contextlib.ExitStack() as stack:
        url = redis_url or stack.enter_context(redis_process())
        cases: list[tuple[str, Callable[[], QuotaStore], Limits]] = [
            ("in-process", LocalQuotaStore, rates),
            ("in-process + concurrent", LocalQuotaStore, with_slots),
            ("redis (leased)", lambda: RedisQuotaStore(url), rates),
            ("redis + concurrent", lambda: RedisQuotaStore(url), with_slots),
        ]
        for label, make, limits in cases:
            seconds = asyncio.run(_admit_loop(make(), (Scope("t:bench", limits),), count))
            out.append({"store": label, "us_per_request": round(seconds / count * 1e6, 2),
                        "admits_per_s": round(count / seconds)})
            print(f"| {label} | {out[-1]['us_per_request']} | {out[-1]['admits_per_s']} |",
                  flush=True)
    return out


def _row(row: dict[str, object]) -> str:
    errors = row.get("errors") or {}
    return (f"| {row['quotas']} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
            f"{row['server_cpu_us_per_request']} | "
            f"{sum(errors.values()) if isinstance(errors, dict) else errors} |")


HEADER = ("| quotas | req/s | p50 ms | p99 ms | server CPU µs/req | errors |\n"
          "|---|---:|---:|---:|---:|---:|")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="quota_bench", description=__doc__)
    parser.add_argument("--model", default="iris")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--store", type=Path, default=demo_store())
    parser.add_argument("--redis-url", help="use this Redis (default: start a private one)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--only", default="",
                        help="comma-separated modes: " + ", ".join(m[0] for m in MODES))
    parser.add_argument("--rounds", type=int, default=1, help="run the modes this many times")
    parser.add_argument("--micro", type=int, metavar="N",
                        help="instead: time N admits through each store, without gRPC")
    args = parser.parse_args(argv)
    unknown = set(filter(None, args.only.split(","))) - {m[0] for m in MODES}
    if unknown:
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    if args.micro:
        print("| store | us/request | admits/s |\n|---|---:|---:|", flush=True)
        results = micro(args.micro, args.redis_url)
        if args.json:
            args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
        return 0
    print(HEADER, flush=True)
    results = run(args.model, concurrency=args.concurrency, duration_s=args.duration,
                  warmup_s=args.warmup, rows=args.rows, store=args.store,
                  redis_url=args.redis_url, only=[m for m in args.only.split(",") if m],
                  rounds=args.rounds)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
