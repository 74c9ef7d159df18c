"""A no-op gRPC proxy on the gateway's grpc.aio stack (and event loop): each ModelInfer's
bytes go to an upstream as they came and its answer's bytes come back, nothing parsed. It is
the ceiling of a Python forwarding path, measured beside the gateway forwarding to the same
upstream (loadtests/forwarding.py).

    python -m loadtests.noop_proxy --port 9002 --upstream 127.0.0.1:8001"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from gateway.process import event_loop
from loadtests.noop_server import METHOD, NoopServer
from loadtests.requests import require_loopback
from loadtests.servers import stop_process

TIMEOUT_S = 30.0  # an upstream call's deadline


class _Forward(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """ModelInfer, bytes in and bytes out: one upstream call per call, on one channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._call = channel.unary_unary(METHOD, None, None)  # bytes through, unparsed
        self._handlers = {METHOD: grpc.unary_unary_rpc_method_handler(self._infer)}

    async def _infer(self, request: bytes, context: Any) -> bytes:
        try:
            answer: bytes = await self._call(request, timeout=TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:  # the upstream's status, passed on
            await context.abort(exc.code(), exc.details() or "")
        return answer

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handlers.get(handler_call_details.method)


async def _serve(port: int, upstream: str, started: Callable[[], None]) -> None:
    async with grpc.aio.insecure_channel(upstream) as channel:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers((_Forward(channel),))
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        started()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        await stopping.wait()
        await server.stop(1)


@contextlib.contextmanager
def start_noop_proxy(port: int, upstream: str) -> Iterator[NoopServer]:
    """The no-op proxy in a subprocess (its own interpreter, like the gateway), forwarding
    to ``upstream``; yields its target and pid once it serves, and stops it."""
    target = require_loopback(f"127.0.0.1:{port}")
    require_loopback(upstream)
    with tempfile.TemporaryDirectory(prefix="modelgate-noop-proxy-") as folder:
        ready = Path(folder) / "ready"
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.noop_proxy", "--port",
                                 str(port), "--upstream", upstream, "--ready-file", str(ready)])
        try:
            give_up = time.monotonic() + 60
            while not ready.exists():
                if proc.poll() is not None or time.monotonic() > give_up:
                    raise RuntimeError("the no-op proxy did not start")
                time.sleep(0.05)
            yield NoopServer(target, proc.pid)
        finally:
            stop_process(proc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.noop_proxy", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="host:port, on loopback")
    parser.add_argument("--ready-file", type=Path, help="written once it serves")
    parser.add_argument("--event-loop", choices=event_loop.CHOICES, default="auto",
                        help="the event loop, chosen as the gateway's event_loop setting")
    args = parser.parse_args(argv)
    try:
        require_loopback(args.upstream)
    except ValueError as exc:
        parser.error(str(exc))
    ready: Path | None = args.ready_file

    def started() -> None:
        if ready is not None:
            ready.write_text("ready\n")

    event_loop.run(_serve(args.port, args.upstream, started), args.event_loop)
    return 0


if __name__ == "__main__":
    sys.exit(main())
