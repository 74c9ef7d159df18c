"""The project's benchmark runner: drives a gateway on loopback closed-loop (fixed
concurrency), open-loop (fixed arrival rate) or, with --stream N, over ModelStreamInfer
streams holding N messages in flight each, with our own grpc.aio stubs; measures throughput
and latency percentiles, and the in-process ONNX Runtime ceiling of each model.

    .venv/bin/python -m loadtests.benchmark --models digits,digits_unbatched \
        --concurrency 1,8,32,128 --duration 5 --json benchmark.json
    .venv/bin/python -m loadtests.benchmark --suite targets --out docs/benchmark
    .venv/bin/python -m loadtests.benchmark --models digits --concurrency 4 --stream 16

Without --target it starts ``modelgate serve`` on a free loopback port (the demo store).
``--suite targets`` runs the issue's performance targets in one go (loadtests/suite.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from loadtests.ceilings import ort_ceiling
from loadtests.noop_server import noop_process
from loadtests.progress import Progress
from loadtests.requests import require_loopback
from loadtests.runner import (
    NOOP,
    LevelPlan,
    format_table,
    ints,
    machine,
    model_file,
    one_answer,
    run_levels,
    run_noop_levels,
    run_stream_levels,
)
from loadtests.servers import free_port, start_gateway
from loadtests.suite import main as run_suite


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtests.benchmark",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--suite", choices=("levels", "targets"), default="levels",
        help="levels: the levels given below (default); targets: the issue's performance "
        "targets in one run (see --suite targets --help)",
    )
    parser.add_argument(
        "--target",
        help="host:port of a running gateway (loopback only); default: start one on a free port",
    )
    parser.add_argument(
        "--store",
        type=Path,
        default=None,
        help="model store (served when starting a gateway; read for the "
        "ceiling's ONNX files); default: the demo store",
    )
    parser.add_argument("--models", default="digits,digits_unbatched")
    parser.add_argument("--concurrency", default="1,8,32,128", help="closed-loop levels")
    parser.add_argument("--rates", default="", help="open-loop levels, requests per second")
    parser.add_argument("--stream", type=int, default=0, metavar="N",
                        help="ModelStreamInfer instead of ModelInfer: each --concurrency level "
                        "is a number of streams, each keeping N messages in flight")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per level")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds first")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--workers", type=int, default=1,
                        help="gateway worker processes (and no-op server processes)")
    parser.add_argument("--channels", type=int, default=4, help="client connections")
    parser.add_argument("--ceiling-rows", default="1,64", help="batch sizes for the ceiling")
    parser.add_argument("--json", type=Path, help="write every figure here as JSON")
    parser.add_argument(
        "--noop", action=argparse.BooleanOptionalAction, default=True,
        help="also measure a no-op gRPC server on the same stack (the front-end ceiling)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from gateway.settings import demo_store

    argv = list(sys.argv[1:] if argv is None else argv)
    # --suite targets has flags of its own: everything but --suite goes to loadtests.suite.
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--suite", choices=("levels", "targets"), default="levels")
    chosen, rest = first.parse_known_args(argv)
    if chosen.suite == "targets":
        return run_suite(rest)
    parser = _parser()
    args = parser.parse_args(argv)
    store = args.store or demo_store()
    models = [m for m in args.models.split(",") if m]
    if args.duration <= 0 or args.duration > 600:
        parser.error("--duration must lie in (0, 600]")
    if args.workers < 1 or args.channels < 1:
        parser.error("--workers and --channels must be at least 1")
    rates = [float(r) for r in args.rates.split(",") if r]
    if args.stream < 0 or args.stream > 10_000 or (args.stream and rates):
        parser.error("--stream takes 1..10000 messages in flight and no --rates")
    levels = len(models) * (len(ints(args.concurrency)) + len(rates))
    levels += len(ints(args.concurrency)) if args.noop else 0
    progress = Progress(levels * (args.warmup + args.duration))
    plan = LevelPlan(args.duration, args.warmup, rows=args.rows, channels=args.channels,
                     workers=args.workers, progress=progress)
    with contextlib.ExitStack() as stack:
        target = (
            require_loopback(args.target)
            if args.target
            else stack.enter_context(start_gateway(store, workers=args.workers)).target
        )
        if args.stream:
            results = asyncio.run(run_stream_levels(
                target, models, ints(args.concurrency), args.stream, plan))
        else:
            results = asyncio.run(run_levels(
                target, models, ints(args.concurrency), rates, plan))
        if args.noop:
            request, answer = asyncio.run(one_answer(target, models[0], args.rows))
    if args.noop:
        # After the gateway stopped: the no-op server gets the machine the gateway had.
        with noop_process(free_port(), answer, workers=args.workers) as noop:
            if args.stream:
                results += asyncio.run(run_stream_levels(
                    noop, [NOOP], ints(args.concurrency), args.stream, plan,
                    label=NOOP, request=request))
            else:
                results += asyncio.run(run_noop_levels(
                    noop, request, ints(args.concurrency), plan))
    # Measured with the gateway stopped, so the ceiling has the machine to itself.
    ceilings: dict[str, dict[int, float]] = {}
    files: dict[Path, str] = {}
    for model in models:
        path = model_file(store, model).resolve()
        if path.read_bytes() in {p.read_bytes() for p in files}:
            continue
        files[path] = model
        ceilings[model] = {
            n: ort_ceiling(path, n, min(args.duration, 5.0)) for n in ints(args.ceiling_rows)
        }
    print()
    print(format_table(results, ceilings))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": machine(),
                    "settings": {k: str(v) for k, v in vars(args).items()},
                    "levels": [r.summary() for r in results],
                    "ceiling_rows_per_s": ceilings,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
