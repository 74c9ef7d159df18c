"""The REST port against Triton's HTTP endpoint on the same models: h2load --h1 (keep-alive
HTTP/1.1, C, little client CPU) posts one fixed infer body, binary (Triton's binary tensor
extension) or JSON, at concurrency 1 (latency) and 32 (throughput), to modelgate and to a
tritonserver serving the same ONNX file (Python backend, from .triton-venv).

    .venv/bin/python -m loadtests.http_bench --models digits,cnn --duration 5

One JSON line per (server, model, body, concurrency)."""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np

from loadtests.servers import free_port, start_gateway

DEMO: Final = Path(__file__).resolve().parents[1] / "gateway" / "demo_store"
# The request each model gets: input name, shape of one row.
INPUTS: Final = {"digits": ("pixels", (64,)), "digits_unbatched": ("pixels", (64,)),
                 "cnn": ("image", (3, 32, 32)), "cnn_unbatched": ("image", (3, 32, 32))}
# Models made here from a demo model without its dynamic batching (each request runs alone).
UNBATCHED: Final = {"cnn_unbatched": "cnn"}


def config_of(model: str) -> str:
    """The model's config.pbtxt (for an UNBATCHED variant: renamed, no dynamic_batching)."""
    source = UNBATCHED.get(model, model)
    config = (DEMO / source / "config.pbtxt").read_text(encoding="utf-8")
    if model in UNBATCHED:
        config = config.replace(f'name: "{source}"', f'name: "{model}"')
        config = re.sub(r"dynamic_batching \{[^}]*\}\n?", "", config)
    return config


def onnx_of(model: str) -> Path:
    return DEMO / UNBATCHED.get(model, model) / "1" / "model.onnx"


def body(model: str, binary: bool) -> tuple[bytes, int | None]:
    """One row's infer body and, for the binary form, its JSON header's length."""
    name, shape = INPUTS[model]
    rows = 1
    x = np.random.default_rng(0).random((rows, *shape), dtype=np.float32)
    spec: dict[str, Any] = {"name": name, "shape": [rows, *shape], "datatype": "FP32"}
    if not binary:
        spec["data"] = x.reshape(-1).tolist()
        return json.dumps({"inputs": [spec]}).encode(), None
    spec["parameters"] = {"binary_data_size": x.nbytes}
    header = json.dumps({"inputs": [spec], "parameters": {"binary_data_output": True}}).encode()
    return header + x.tobytes(), len(header)


_FINISHED = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_LATENCY = re.compile(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+"
                      r"([\d.]+)(us|ms|s)")
_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")
_SCALE: Final = {"us": 1.0, "ms": 1e3, "s": 1e6}


def h2load(url: str, data: Path, header_length: int | None, clients: int,
           duration_s: float) -> dict[str, float]:
    """Req/s and mean latency (µs) of one run; raises if any answer was not 2xx."""
    command = ["h2load", "--h1", "-c", str(clients), "-m", "1", "-D", str(round(duration_s)),
               "--warm-up-time", "1", "-d", str(data),
               "-H", "content-type: application/octet-stream"]
    if header_length is not None:
        command += ["-H", f"inference-header-content-length: {header_length}"]
    text = subprocess.run([*command, url], capture_output=True, text=True,
                          timeout=duration_s + 120, check=True).stdout
    finished, latency, status = _FINISHED.search(text), _LATENCY.search(text), _STATUS.search(text)
    if finished is None or latency is None or status is None:
        raise RuntimeError(f"unexpected h2load output:\n{text}")
    if any(int(n) for n in status.groups()[1:]):
        raise RuntimeError(f"non-2xx answers:\n{text}")
    return {"req_per_s": float(finished.group(1)),
            "mean_latency_us": float(latency.group(5)) * _SCALE[latency.group(6)]}


@contextlib.contextmanager
def modelgate(models: Sequence[str], extra: Sequence[str]) -> Iterator[int]:
    """``modelgate serve`` over the demo models; yields its REST port."""
    with tempfile.TemporaryDirectory(prefix="modelgate-http-bench-") as tmp:
        store = Path(tmp)
        for model in models:
            if model in UNBATCHED:
                (store / model / "1").mkdir(parents=True)
                (store / model / "config.pbtxt").write_text(config_of(model), encoding="utf-8")
                (store / model / "1" / "model.onnx").symlink_to(onnx_of(model))
            else:
                (store / model).symlink_to(DEMO / model)
        port = free_port()
        with start_gateway(store, ["--http-port", str(port), *extra]):
            yield port


@contextlib.contextmanager
def triton(models: Sequence[str]) -> Iterator[int]:
    """tritonserver over the same ONNX files (Python backend); yields its HTTP port."""
    # Imported here: only a checkout with the test support has it.
    from tests.support.triton_server import TritonServer, triton_install, write_python_model

    with tempfile.TemporaryDirectory(prefix="modelgate-http-bench-triton-") as tmp:
        workdir = Path(tmp)
        repo = workdir / "repo"
        for model in models:
            # write_python_model adds its own instance group (one CPU instance, like ours).
            config = re.sub(r"instance_group \[[^\]]*\]\n?", "", config_of(model))
            write_python_model(repo, model, onnx_of(model).read_bytes(), config)
        port = free_port()
        server = TritonServer(triton_install(), repo, workdir, extra_args=(
            "--allow-http=true", "--http-address=127.0.0.1", f"--http-port={port}"))
        try:
            server.start(120)
            yield port
        finally:
            server.stop()


def measure(server: str, port: int, models: Sequence[str], duration_s: float,
            levels: Sequence[int]) -> Iterator[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        for model in models:
            for binary in (True, False):
                data, header_length = body(model, binary)
                path = Path(tmp) / f"{model}-{binary}"
                path.write_bytes(data)
                url = f"http://127.0.0.1:{port}/v2/models/{model}/infer"
                for clients in levels:
                    result = h2load(url, path, header_length, clients, duration_s)
                    yield {"server": server, "model": model,
                           "body": "binary" if binary else "json", "concurrency": clients,
                           "req_per_s": round(result["req_per_s"], 1),
                           "mean_latency_ms": round(result["mean_latency_us"] / 1000, 3)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="digits,cnn")
    parser.add_argument("--duration", type=int, default=5, help="seconds per level")
    parser.add_argument("--concurrency", default="1,32")
    parser.add_argument("--servers", default="modelgate,triton")
    parser.add_argument("--workers", type=int, default=1,
                        help="modelgate worker processes (they share the REST port)")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(models) - set(INPUTS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(INPUTS)}")
    levels = [int(c) for c in args.concurrency.split(",")]
    for server in args.servers.split(","):
        starter = (modelgate(models, ("--workers", str(args.workers))) if server == "modelgate"
                   else triton(models))
        with starter as port:
            for row in measure(server, port, models, args.duration, levels):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
