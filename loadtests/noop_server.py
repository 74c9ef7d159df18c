"""A no-op V2 inference server on the same grpc.aio stack as the gateway: ModelInfer answers
fixed bytes and parses nothing, and ModelStreamInfer answers each message of a stream with the
same bytes wrapped as a stream response, so it measures this machine's ceiling for a Python
gRPC front, unary and streaming (on the gateway's event loop: uvloop when installed).

    python -m loadtests.noop_server --port 9001 --answer-file response.bin [--workers 2]

With --workers N, N processes share the port (SO_REUSEPORT), as ``modelgate serve --workers``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from gateway.process import event_loop
from gateway.process.event_loop import CHOICES
from loadtests.requests import require_loopback
from loadtests.servers import stop_process
from modelgate_pb import grpc_service_pb2 as pb

METHOD = "/inference.GRPCInferenceService/ModelInfer"
STREAM_METHOD = "/inference.GRPCInferenceService/ModelStreamInfer"


def stream_answer(answer: bytes) -> bytes:
    """``answer`` (a serialized ModelInferResponse, not parsed) wrapped as the
    ModelStreamInferResponse's infer_response field (2, length-delimited)."""
    length, size = bytearray(), len(answer)
    while size > 0x7F:
        length.append((size & 0x7F) | 0x80)
        size >>= 7
    length.append(size)
    tag = pb.ModelStreamInferResponse.DESCRIPTOR.fields_by_name["infer_response"].number << 3 | 2
    return bytes([tag]) + bytes(length) + answer


class _FixedAnswer(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves ModelInfer and ModelStreamInfer without (de)serializers: request bytes in,
    fixed bytes out (one answer per message on a stream, sent as each message is read)."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._streamed = stream_answer(answer)
        self._handlers = {
            METHOD: grpc.unary_unary_rpc_method_handler(self._infer),
            STREAM_METHOD: grpc.stream_stream_rpc_method_handler(self._stream),
        }

    async def _infer(self, request: bytes, context: Any) -> bytes:
        return self._answer

    async def _stream(self, requests: AsyncIterator[bytes], context: Any
                      ) -> AsyncIterator[bytes]:
        answer = self._streamed
        async for _ in requests:
            yield answer

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method)


async def _serve(
    port: int, answer: bytes, shared: bool, parent: int | None, started: Callable[[], None]
) -> None:
    await serve_handler(port, _FixedAnswer(answer), started, shared=shared, parent=parent)


async def serve_handler(
    port: int, handler: grpc.GenericRpcHandler, started: Callable[[], None],  # type: ignore[type-arg]
    *, shared: bool = False, parent: int | None = None,
) -> None:
    """A grpc.aio server of ``handler`` on the loopback ``port`` until SIGTERM or SIGINT
    (or, with ``parent``, until that supervisor is gone); ``started`` once it serves."""
    server = grpc.aio.server(options=[("grpc.so_reuseport", 1 if shared else 0)])
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    started()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    while not stopping.is_set():
        # A worker whose supervisor is gone (even killed) stops instead of holding the port.
        if parent is not None and os.getppid() != parent:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stopping.wait(), 1.0)
    await server.stop(1)


def _worker(port: int, answer: bytes, parent: int, started: Any, loop: str) -> None:
    event_loop.run(_serve(port, answer, True, parent, lambda: started.put(os.getpid())), loop)


def _supervise(
    port: int, answer: bytes, workers: int, ready_file: Path | None, loop: str = "auto"
) -> None:
    """One process per worker on the shared port; stops them all on SIGTERM or SIGINT."""

    def ready() -> None:
        if ready_file is not None:
            ready_file.write_text(f"{workers}\n")

    if workers == 1:
        event_loop.run(_serve(port, answer, False, None, ready), loop)
        return
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    context = multiprocessing.get_context("spawn")
    started = context.Queue()
    procs = [context.Process(target=_worker, args=(port, answer, os.getpid(), started, loop))
             for _ in range(workers)]
    try:
        for proc in procs:
            proc.start()
        for _ in procs:
            started.get(timeout=60)
        ready()
        while not stop.wait(0.5):
            if any(not p.is_alive() for p in procs):
                break  # a benchmark wants all N workers or none
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.join(10)


@dataclass(frozen=True)
class NoopServer:
    target: str
    pid: int  # the supervisor's, when several workers serve


def wait_ready(proc: subprocess.Popen[bytes], ready: Path, what: str,
               seconds: float = 60.0) -> float:
    """Waits until ``proc`` has written ``ready``, and returns the monotonic time it gives
    up at; raises if ``proc`` ends or ``seconds`` pass first."""
    give_up = time.monotonic() + seconds
    while not ready.exists():
        if proc.poll() is not None or time.monotonic() > give_up:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.05)
    return give_up


def server_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every no-op server process takes: its port, a ready file, the loop."""
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--ready-file", type=Path, help="written once it serves")
    parser.add_argument("--event-loop", choices=CHOICES, default="auto",
                        help="the event loop, chosen as the gateway's event_loop setting")


@contextlib.contextmanager
def noop_process(port: int, answer: bytes, workers: int = 1) -> Iterator[str]:
    """The no-op server in a subprocess (its own interpreter, like the gateway) with
    ``workers`` processes on the port; yields its target once all answer, and stops it."""
    with start_noop(port, answer, workers) as server:
        yield server.target


@contextlib.contextmanager
def start_noop(port: int, answer: bytes, workers: int = 1) -> Iterator[NoopServer]:
    """noop_process, yielding the server's target and pid."""
    target = require_loopback(f"127.0.0.1:{port}")
    with tempfile.TemporaryDirectory(prefix="modelgate-noop-") as folder:
        answer_file, ready = Path(folder) / "answer.bin", Path(folder) / "ready"
        answer_file.write_bytes(answer)
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.noop_server", "--port",
                                 str(port), "--answer-file", str(answer_file), "--workers",
                                 str(workers), "--ready-file", str(ready)])
        try:
            give_up = wait_ready(proc, ready, "the no-op server")
            with grpc.insecure_channel(target) as channel:
                call = channel.unary_unary(METHOD, None, None)
                while True:
                    try:
                        call(b"", timeout=1)
                        break
                    except grpc.RpcError:
                        if proc.poll() is not None or time.monotonic() > give_up:
                            raise
                        time.sleep(0.1)
            yield NoopServer(target, proc.pid)
        finally:
            stop_process(proc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.noop_server", description=__doc__)
    server_arguments(parser)
    parser.add_argument("--answer-file", type=Path, required=True)
    parser.add_argument("--workers", type=int, default=1, help="processes sharing the port")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error("--workers must be at least 1")
    _supervise(args.port, args.answer_file.read_bytes(), args.workers, args.ready_file,
               args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
