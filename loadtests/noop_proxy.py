"""A no-op gRPC proxy on the gateway's grpc.aio stack (and event loop): each ModelInfer's
bytes go to an upstream as they came and its answer's bytes come back, nothing parsed. It is
the ceiling of a Python forwarding path, measured beside the gateway forwarding to the same
upstream (loadtests/forwarding.py).

    python -m loadtests.noop_proxy --port 9002 --upstream 127.0.0.1:8001"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from gateway.process import event_loop
from loadtests.noop_server import (
    METHOD,
    NoopServer,
    serve_handler,
    server_arguments,
    wait_ready,
)
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
        await serve_handler(port, _Forward(channel), started)


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
            wait_ready(proc, ready, "the no-op proxy")
            yield NoopServer(target, proc.pid)
        finally:
            stop_process(proc)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.noop_proxy", description=__doc__)
    server_arguments(parser)
    parser.add_argument("--upstream", required=True, help="host:port, on loopback")
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
