"""The REST listener on uvloop (the serving loop of `modelgate serve`): it answers, keeps
the connection alive, and on drain answers the request in progress with Connection: close
before closing, while a new connection is refused."""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from gateway.http.connection import Limits
from gateway.http.listener import HttpListener
from gateway.http.messages import HttpRequest, HttpResponse, json_response
from tests.support.waiting import until

pytestmark = pytest.mark.timeout(60)


async def _exchange(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    return reader, writer


async def _answer(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length"))
    return head + await reader.readexactly(length)


async def _scenario() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def handler(request: HttpRequest) -> HttpResponse:
        if request.path == "/slow":
            entered.set()
            await release.wait()
        return json_response(200, {"path": request.path})

    listener = HttpListener(handler, Limits(max_body_bytes=1024))
    port = await listener.start("127.0.0.1", 0, reuse_port=True)
    reader, writer = await _exchange(port, "/fast")
    first = await _answer(reader)
    assert first.startswith(b"HTTP/1.1 200 OK") and b'{"path":"/fast"}' in first
    assert b"Connection: close" not in first  # kept alive
    writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    await entered.wait()
    stopping = asyncio.ensure_future(listener.stop(grace=30))
    await until(lambda: listener.open_connections == 1, "idle connections closed")

    async def refused() -> bool:
        try:
            _, probe_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        probe_writer.close()
        return False

    # The listening socket closes within a few loop turns of the drain starting.
    await until(refused, "new connections refused while draining", limit_s=10.0,
                interval=0.01)
    release.set()
    answer = await _answer(reader)
    assert b'{"path":"/slow"}' in answer and b"Connection: close" in answer
    assert await reader.read() == b""  # then closed
    await stopping
    writer.close()


def test_the_listener_serves_and_drains_on_uvloop() -> None:
    uvloop.run(_scenario())
