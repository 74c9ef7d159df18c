"""Drives ModelInfer with h2load (nghttp2's C HTTP/2 load generator): far less client CPU
per request than our Python client, so on a small machine the server, not the client, limits.

h2load posts one fixed body (a gRPC frame holding the serialized request) and reads neither
gRPC trailers nor messages: it sees HTTP 200 for a gRPC error too, so callers check answers
another way (one real call first; the gateway's own counters by status code)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from loadtests.requests import require_loopback
from loadtests.results import LevelResult
from modelgate_pb import grpc_service_pb2 as pb

PATH = "/inference.GRPCInferenceService/ModelInfer"
STREAM_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"
GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def binary() -> str | None:
    """The h2load executable, if installed (Debian/Ubuntu: nghttp2-client)."""
    return shutil.which("h2load")


def grpc_frame(message: bytes) -> bytes:
    """One length-prefixed gRPC message: uncompressed flag 0, 4-byte big-endian length."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def parse_frame(frame: bytes) -> bytes:
    """The message inside a single uncompressed gRPC frame (the inverse of grpc_frame)."""
    if len(frame) < 5 or frame[0] != 0:
        raise ValueError("not an uncompressed gRPC frame")
    length = int.from_bytes(frame[1:5], "big")
    if len(frame) != 5 + length:
        raise ValueError(f"frame says {length} bytes, carries {len(frame) - 5}")
    return frame[5:]


def body_for(request: pb.ModelInferRequest) -> bytes:
    return grpc_frame(request.SerializeToString())


def stream_body_for(request: pb.ModelInferRequest, messages: int) -> bytes:
    """``messages`` gRPC frames, one ModelInferRequest each (ids "0".."n-1"): posted to
    ModelStreamInfer, each h2load request is a stream that sends them all, half-closes and
    reads one answer per message, so a server holds up to ``messages`` in flight per stream."""
    if messages < 1:
        raise ValueError(f"a stream body needs at least one message, not {messages}")
    frames = []
    for index in range(messages):
        message = pb.ModelInferRequest()
        message.CopyFrom(request)
        message.id = str(index)
        frames.append(grpc_frame(message.SerializeToString()))
    return b"".join(frames)


@dataclass
class H2loadRun:
    """What one h2load run printed, and the per-request rows of its log file."""

    duration_s: float  # the measured (main) duration
    reported_req_per_s: float
    done: int
    succeeded: int
    failed: int
    errored: int
    timed_out: int
    latencies_s: list[float] = field(default_factory=list)  # of HTTP 200 answers
    http_errors: Counter[str] = field(default_factory=Counter)  # other statuses
    command: list[str] = field(default_factory=list)  # what ran (temporary file paths)
    # When each logged request ended (any status), in seconds since the epoch: what counts
    # the answers of a window inside the run.
    ended_s: list[float] = field(default_factory=list)


_FINISHED = re.compile(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, "
    r"(\d+) errored, (\d+) timeout"
)


def parse_output(text: str, duration_s: float) -> H2loadRun:
    """The summary h2load prints on stdout (its log rows are read by read_log)."""
    finished, counts = _FINISHED.search(text), _REQUESTS.search(text)
    if finished is None or counts is None:
        raise ValueError(f"h2load printed no summary:\n{text[-2000:]}")
    done, succeeded, failed, errored, timed_out = (int(v) for v in counts.groups()[2:])
    return H2loadRun(duration_s, float(finished.group(3)), done, succeeded, failed, errored,
                     timed_out)


def read_log(run: H2loadRun, log: str) -> H2loadRun:
    """Adds ``--log-file`` rows (start µs since the epoch, HTTP status, µs to the end of the
    answer) to ``run``: h2load prints no percentiles, but logs every request."""
    for line in log.splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        status, micros = parts[1], int(parts[2])
        run.ended_s.append((int(parts[0]) + micros) / 1e6)
        if status == "200":
            run.latencies_s.append(micros / 1e6)
        else:
            # -1: the stream never got a status (reset or the connection failed).
            run.http_errors[f"HTTP {status}" if status != "-1" else "no answer"] += 1
    return run


def run_h2load(
    target: str,
    body: bytes,
    *,
    connections: int,
    streams: int,
    duration_s: float,
    warmup_s: float,
    headers: Sequence[str] = (),
    rate_per_s: float | None = None,
    path: str = PATH,
    requests: int | None = None,
) -> H2loadRun:
    """``connections`` HTTP/2 connections with ``streams`` concurrent streams each, posting
    ``body`` to ModelInfer for ``warmup_s`` + ``duration_s`` (one client thread, to leave
    the cores to the server). Bounded by h2load's -D and a subprocess timeout.

    Closed loop by default: each stream sends its next request when the last is answered.
    With ``rate_per_s``, at a fixed rate instead (``--rps``, split evenly over the
    connections): arrivals do not wait for answers while a connection has a stream free,
    so ``streams`` must exceed what the rate keeps in flight. ``path`` is the method posted
    to (STREAM_PATH with a stream_body_for body measures streaming). With ``requests``,
    h2load sends that many and waits for every answer instead of stopping after
    ``duration_s`` (``-n``, no warm-up): no stream is cut off mid-flight, and the run's
    duration is the time it took."""
    executable = binary()
    if executable is None:
        raise RuntimeError("h2load not found (scripts/install_test_deps.sh installs it)")
    require_loopback(target)
    with tempfile.TemporaryDirectory(prefix="modelgate-h2load-") as folder:
        body_file, log_file = Path(folder) / "body.bin", Path(folder) / "log.tsv"
        body_file.write_bytes(body)
        # Durations in ms: h2load takes no fractional seconds.
        command = [executable, "-t", "1", "-c", str(connections), "-m", str(streams),
                   "-d", str(body_file), "--log-file", str(log_file)]
        if requests is not None:
            if requests < connections * streams:
                raise ValueError(f"{requests} requests cannot fill {connections * streams} "
                                 "streams")
            command += ["-n", str(requests)]
        else:
            command += ["-D", f"{round(duration_s * 1000)}ms"]
        if warmup_s > 0 and requests is None:
            command += ["--warm-up-time", f"{round(warmup_s * 1000)}ms"]
        if rate_per_s is not None:
            if rate_per_s <= 0:
                raise ValueError(f"rate_per_s must be positive, not {rate_per_s}")
            command += ["--rps", f"{rate_per_s / connections:.3f}"]
        for header in (*GRPC_HEADERS, *headers):
            command += ["-H", header]
        command.append(f"http://{target}{path}")
        done = subprocess.run(command, capture_output=True, text=True, check=False,
                              timeout=warmup_s + duration_s + 60)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-2000:]}")
        run = parse_output(done.stdout, duration_s)
        if requests is not None:  # the time it took: requests / h2load's own rate
            run.duration_s = run.done / run.reported_req_per_s if run.reported_req_per_s else 0
        run.command = command
        return read_log(run, log_file.read_text() if log_file.exists() else "")


def as_level(run: H2loadRun, model: str, *, rows: int, workers: int, label: str = "",
             connections: int, streams: int) -> LevelResult:
    """A closed-loop level (``connections * streams`` concurrent requests) of an h2load run;
    transport failures count as errors here, gRPC errors must be added by the caller."""
    errors = dict(run.http_errors)
    for name, count in (("h2load errored", run.errored), ("h2load timeout", run.timed_out)):
        if count:
            errors[name] = count
    return LevelResult(model, "closed", float(connections * streams), rows, run.duration_s,
                       run.latencies_s, errors, driver="h2load", workers=workers, label=label)
