"""A real ``redis-server`` process for tests, on a free loopback port, without persistence;
it can be stopped and started again on the same port to simulate an outage."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tests.support.gateway import free_port
from tests.support.waiting import wait_until


class RedisServer:
    """``redis-server`` bound to 127.0.0.1 on ``port``; ``url`` is what the gateway gets."""

    def __init__(self, port: int | None = None, unix_socket: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed: run scripts/install_test_deps.sh")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="modelgate-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = self.dir / "redis.sock" if unix_socket else None

    @property
    def url(self) -> str:
        if self.socket is not None:
            return f"unix://{self.socket}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
             *(["--unixsocket", str(self.socket), "--unixsocketperm", "700"]
               if self.socket else [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        proc = self.proc

        def answers() -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {proc.returncode}")
            return self.ping()

        wait_until(answers, "redis-server answering PING", timeout)

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def flush(self) -> None:
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(16)


def fresh_redis() -> Iterator[RedisServer]:
    """A redis-server for the length of a fixture: ``yield from fresh_redis()``."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(server.dir, ignore_errors=True)
