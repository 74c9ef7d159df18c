"""The demo CNN with 64-row requests, tensors passed by value against by system shared
memory, over gRPC and REST (tritonclient, closed-loop callers against ``modelgate serve``):
latency percentiles and throughput per level, the two modes in alternating rounds.

    .venv/bin/python -m loadtests.shm_bench --rounds 6 --requests 50

The demo store's ``cnn`` takes at most 32 rows; the run serves a copy of it with
max_batch_size 64 (same model file, same dynamic batching)."""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.utils.shared_memory as shm

from gateway.settings import demo_store
from loadtests.servers import free_port, start_gateway

ROWS = 64
SHAPE = (ROWS, 3, 32, 32)
OUT_SHAPE = (ROWS, 10)
IN_BYTES = int(np.prod(SHAPE)) * 4
OUT_BYTES = int(np.prod(OUT_SHAPE)) * 4


def store_with_64_rows(into: Path) -> Path:
    """A store holding the demo CNN with max_batch_size 64."""
    shutil.copytree(demo_store() / "cnn", into / "cnn")
    config = into / "cnn" / "config.pbtxt"
    text = config.read_text(encoding="utf-8")
    assert "max_batch_size: 32" in text
    config.write_text(text.replace("max_batch_size: 32", f"max_batch_size: {ROWS}"),
                      encoding="utf-8")
    return into


def _caller(module: Any, url: str, by_memory: bool, tag: str) -> Callable[[], None]:
    """One request function of a fresh client: by value, or through its own two regions."""
    client = module.InferenceServerClient(url)
    x = np.random.default_rng(7).standard_normal(SHAPE, dtype=np.float32)
    tensor = module.InferInput("image", list(SHAPE), "FP32")
    output = module.InferRequestedOutput("logits")
    if not by_memory:
        tensor.set_data_from_numpy(x)

        def by_value() -> None:
            result = client.infer("cnn", [tensor], outputs=[output])
            assert result.as_numpy("logits").shape == OUT_SHAPE
        return by_value
    keys = (f"/mg_bench_in_{tag}_{os.getpid()}", f"/mg_bench_out_{tag}_{os.getpid()}")
    regions = (shm.create_shared_memory_region(f"in{tag}", keys[0], IN_BYTES),
               shm.create_shared_memory_region(f"out{tag}", keys[1], OUT_BYTES))
    client.register_system_shared_memory(f"in{tag}", keys[0], IN_BYTES)
    client.register_system_shared_memory(f"out{tag}", keys[1], OUT_BYTES)
    tensor.set_shared_memory(f"in{tag}", IN_BYTES)
    output.set_shared_memory(f"out{tag}", OUT_BYTES)

    def by_memory_call() -> None:
        shm.set_shared_memory_region(regions[0], [x])  # the client's copy into the region
        client.infer("cnn", [tensor], outputs=[output])
        logits = shm.get_contents_as_numpy(regions[1], np.float32, list(OUT_SHAPE))
        assert logits.shape == OUT_SHAPE
    _REGIONS.extend(regions)
    return by_memory_call


_REGIONS: list[Any] = []


def _round(calls: list[Callable[[], None]], requests: int) -> tuple[list[float], float]:
    """``requests`` per caller, the callers at once: latencies and wall time."""
    latencies: list[float] = []
    lock = threading.Lock()

    def loop(call: Callable[[], None]) -> None:
        mine = []
        for _ in range(requests):
            started = time.perf_counter()
            call()
            mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)

    started = time.perf_counter()
    if len(calls) == 1:  # here: the REST client (gevent) stays on the thread that made it
        loop(calls[0])
    else:
        threads = [threading.Thread(target=loop, args=(c,)) for c in calls]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return latencies, time.perf_counter() - started


def run_level(module: Any, url: str, callers: int, rounds: int,
              requests: int) -> dict[bool, dict[str, float]]:
    """``callers`` closed-loop callers by value and by shared memory, in alternating
    rounds (a shared, busy machine drifts: alternation spreads it over both), after a
    warm-up round of each; per mode the latency percentiles and the median round's
    throughput."""
    modes = {by_memory: [_caller(module, url, by_memory, f"{len(_REGIONS)}_{by_memory}_{i}")
                         for i in range(callers)] for by_memory in (False, True)}
    for calls in modes.values():
        _round(calls, 10)
    latencies: dict[bool, list[float]] = {False: [], True: []}
    rates: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(rounds):
        for by_memory, calls in modes.items():
            times, wall = _round(calls, requests)
            latencies[by_memory] += times
            rates[by_memory].append(len(times) / wall)
    results = {}
    for by_memory, times in latencies.items():
        times.sort()
        results[by_memory] = {"p50_ms": statistics.median(times) * 1e3,
                              "p90_ms": times[int(len(times) * 0.9) - 1] * 1e3,
                              "req_s": statistics.median(rates[by_memory])}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="per caller and round")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds per mode")
    parser.add_argument("--callers", default="1,4", help="gRPC levels (REST runs one caller)")
    args = parser.parse_args()
    http_port = free_port()
    with tempfile.TemporaryDirectory() as folder, start_gateway(
        store_with_64_rows(Path(folder)), ["--http-port", str(http_port)]
    ) as served:
        rows = []
        levels = [("grpc", grpcclient, served.target, int(c))
                  for c in args.callers.split(",")]
        levels.append(("http", httpclient, f"127.0.0.1:{http_port}", 1))
        for protocol, module, url, callers in levels:
            results = run_level(module, url, callers, args.rounds, args.requests)
            for by_memory, result in results.items():
                rows.append((protocol, callers, "shared memory" if by_memory else "by value",
                             result))
        for region in _REGIONS:
            shm.destroy_shared_memory_region(region)
    print("| transport | callers | tensors | p50 latency | p90 latency | req/s |")
    print("|---|---|---|---|---|---|")
    for protocol, callers, how, r in rows:
        print(f"| {protocol} | {callers} | {how} | {r['p50_ms']:.2f} ms | "
              f"{r['p90_ms']:.2f} ms | {r['req_s']:.0f} |")


if __name__ == "__main__":
    main()
