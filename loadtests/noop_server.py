"""A no-op V2 inference server on the same grpc.aio stack as the gateway: ModelInfer answers
fixed bytes and parses nothing, so it measures this machine's ceiling for a Python gRPC front.

    python -m loadtests.noop_server --port 9001 --answer-file response.bin
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from loadtests.requests import require_loopback

METHOD = "/inference.GRPCInferenceService/ModelInfer"


class _FixedAnswer(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    """Serves ModelInfer without (de)serializers: request bytes in, fixed bytes out."""

    def __init__(self, answer: bytes) -> None:
        self._answer = answer
        self._handler = grpc.unary_unary_rpc_method_handler(self._infer)

    async def _infer(self, request: bytes, context: Any) -> bytes:
        return self._answer

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> Any:
        return self._handler if handler_call_details.method == METHOD else None


async def _serve(port: int, answer: bytes) -> None:
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_FixedAnswer(answer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop(1)


@contextlib.contextmanager
def noop_process(port: int, answer: bytes) -> Iterator[str]:
    """The no-op server in a subprocess (its own interpreter, like the gateway); yields its
    target once it answers, and stops it afterwards."""
    target = require_loopback(f"127.0.0.1:{port}")
    with tempfile.NamedTemporaryFile(suffix=".bin") as file:
        file.write(answer)
        file.flush()
        proc = subprocess.Popen([sys.executable, "-m", "loadtests.noop_server", "--port",
                                 str(port), "--answer-file", file.name])
        try:
            with grpc.insecure_channel(target) as channel:
                call = channel.unary_unary(METHOD, None, None)
                give_up = time.monotonic() + 60
                while True:
                    try:
                        call(b"", timeout=1)
                        break
                    except grpc.RpcError:
                        if proc.poll() is not None or time.monotonic() > give_up:
                            raise
                        time.sleep(0.1)
            yield target
        finally:
            proc.terminate()
            proc.wait(30)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.noop_server", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--answer-file", type=Path, required=True)
    args = parser.parse_args(argv)
    asyncio.run(_serve(args.port, args.answer_file.read_bytes()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
