"""The compute ceiling: ONNX Runtime itself on a model's ONNX file in this process, with the
gateway's own session options: rows per second per batch size, and single-call latency."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def ort_session(model_file: Path, threads: int | None = None) -> ort.InferenceSession:
    """A session built as runtimes/onnx_runtime.py builds one, with the gateway's default
    thread counts (settings) unless ``threads`` overrides the intra-op count."""
    from gateway.settings import Settings
    from runtimes.onnx_runtime import providers_for

    defaults = Settings()
    options = ort.SessionOptions()
    options.intra_op_num_threads = defaults.intra_op_threads if threads is None else threads
    options.inter_op_num_threads = defaults.inter_op_threads
    options.log_severity_level = 3
    return ort.InferenceSession(
        str(model_file), options, providers=list(providers_for(defaults.device))
    )


def _feeds(session: ort.InferenceSession, rows: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for tensor in session.get_inputs():
        shape = [
            rows if i == 0 else (d if isinstance(d, int) else 1) for i, d in enumerate(tensor.shape)
        ]
        feeds[tensor.name] = rng.uniform(0, 16, size=shape).astype(np.float32)
    return feeds


def ort_ceiling(model_file: Path, rows: int, duration_s: float, threads: int = 1) -> float:
    """Rows per second of ONNX Runtime itself on ``rows``-row batches in this process (the
    gateway's own session options: CPU unless CUDA works, ``threads`` intra-op threads)."""
    session = ort_session(model_file, threads)
    feeds = _feeds(session, rows)
    for _ in range(20):
        session.run(None, feeds)
    runs = 0
    start = time.perf_counter()
    while (elapsed := time.perf_counter() - start) < duration_s:
        session.run(None, feeds)
        runs += 1
    return runs * rows / elapsed


def ort_ceilings(
    model_file: Path, batch_sizes: Sequence[int], duration_s: float
) -> dict[int, float]:
    """Rows per second at every batch size, with the gateway's thread counts."""
    from gateway.settings import Settings

    threads = Settings().intra_op_threads
    return {n: ort_ceiling(model_file, n, duration_s, threads) for n in batch_sizes}


def ort_latencies(model_file: Path, rows: int, duration_s: float) -> list[float]:
    """Seconds per ``session.run`` on ``rows`` rows, call by call in a tight loop: what the
    gateway's runtime call costs at concurrency 1, without any serving around it."""
    session = ort_session(model_file)
    feeds = _feeds(session, rows)
    for _ in range(50):
        session.run(None, feeds)
    latencies: list[float] = []
    end = time.perf_counter() + duration_s
    while (began := time.perf_counter()) < end:
        session.run(None, feeds)
        latencies.append(time.perf_counter() - began)
    return latencies
