"""Runs the real gateway for tests: in a background thread's event loop (fast, in-process)
or as the real ``modelgate serve`` command in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc

from gateway.process.server import Gateway
from gateway.settings import Settings, demo_store
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.waiting import wait_server_ready

T = TypeVar("T")
REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A currently free loopback TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclasses.dataclass
class RunningGateway:
    """A Gateway serving on 127.0.0.1:``port`` from a background event loop."""

    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    port: int

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        """Run a coroutine in the server's loop and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stub(self) -> pb_grpc.GRPCInferenceServiceStub:
        """A synchronous stub of our own generated code on a fresh channel."""
        return pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(self.target))


@contextlib.contextmanager
def running_gateway(store: Path | None = None, **overrides: Any) -> Iterator[RunningGateway]:
    """Start the real Gateway on a free loopback port; stop and drain it on exit."""
    settings = dataclasses.replace(
        Settings(),
        store=store or demo_store(),
        host="127.0.0.1",
        grpc_port=0,
        metrics_port=0,
        grace_period_s=2.0,
        **overrides,
    )
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="gateway-loop", daemon=True)
    thread.start()
    gateway = asyncio.run_coroutine_threadsafe(_build(settings), loop).result(30)
    try:
        port = asyncio.run_coroutine_threadsafe(gateway.start(), loop).result(120)
        yield RunningGateway(gateway=gateway, loop=loop, port=port)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(gateway.stop(grace=1.0), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        loop.close()


async def _build(settings: Settings) -> Gateway:
    # The grpc.aio server binds itself to the loop it is created in.
    return Gateway(settings)


class GatewayProcess:
    """The real ``modelgate serve`` command in a subprocess on a free loopback port."""

    def __init__(
        self,
        args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        port: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.port = port or free_port()
        self.log_path = Path(tempfile.mkstemp(prefix="modelgate-", suffix=".log")[1])
        # Metrics on a free port (each worker its own), so parallel runs never collide;
        # ``args`` may still name one (the last flag wins).
        command = [sys.executable, "-m", "gateway.process.cli", "serve", "--host", "127.0.0.1",
                   "--grpc-port", str(self.port), "--metrics-port", "0", *args]
        full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, env=full_env,
            cwd=cwd or REPO_ROOT,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until ServerReady says ready; raise with the log if the process died."""
        wait_server_ready(self.target, self.proc, "gateway", self.log, timeout)

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def __enter__(self) -> GatewayProcess:
        try:
            self.wait_ready()
        except BaseException:
            self.kill()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        if not self._log.closed:
            self._log.close()
