"""Raw HTTP/1.1 on a socket, for the hostile REST tests: what a client writes goes out as
bytes (bad framing included), and what the server answers is read until it closes."""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
from dataclasses import dataclass

_STATUS = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]*\r\n")

INFER = "/v2/models/add/versions/1/infer"
GOOD_BODY = json.dumps({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                                    "data": [1, 2, 3, 4]}]}).encode()


@dataclass
class Exchange:
    """What came back on one connection: the raw bytes, until the server closed."""

    raw: bytes

    @property
    def statuses(self) -> list[int]:
        return [int(m.group(1)) for m in _STATUS.finditer(self.raw)]

    def header(self, name: str) -> str | None:
        found = re.search(rb"\r\n" + name.encode() + rb": ([^\r\n]*)", self.raw, re.IGNORECASE)
        return found.group(1).decode() if found else None


def post(path: str, body: bytes, headers: dict[str, str] | None = None, *,
         close: bool = False) -> bytes:
    """A well-framed POST with Content-Length."""
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", f"Content-Length: {len(body)}",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunked_head(path: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"POST {path} HTTP/1.1", "Host: gateway", "Transfer-Encoding: chunked",
             "Connection: close",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def tiny_chunks(body_bytes: int) -> bytes:
    """A chunked body of two-byte chunks (7 bytes on the wire each), then the last chunk."""
    return b"2\r\nxx\r\n" * (body_bytes // 2) + b"0\r\n\r\n"


def exchange(port: int, payload: bytes, timeout: float = 60.0) -> Exchange:
    """Write ``payload`` (from a thread, so an answer that comes before the server read it
    all is still read here) and read until the server closes the connection. A reset
    after the answer (the server stopped reading) ends the read like a close."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def write() -> None:
        with contextlib.suppress(OSError):
            sock.sendall(payload)

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    chunks = []
    try:
        while True:
            try:
                data = sock.recv(65536)
            except ConnectionResetError:
                break
            if not data:
                break
            chunks.append(data)
    finally:
        writer.join(timeout)
        sock.close()
    return Exchange(b"".join(chunks))
