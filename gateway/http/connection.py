"""One client connection of the REST port: an asyncio protocol around the httptools parser.
It bounds what a client may make the server hold (head size, body size and the port's body
budget, time to send a request, idle keep-alive time), screens a request's head (its API
key) before reading its body, serves a connection's requests one at a time, in order (a
framing error is answered after every complete request before it), and on drain finishes
the request in progress before closing."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, cast

import httptools

from gateway.http.body_budget import BodyBudget
from gateway.http.messages import HttpRequest, HttpResponse, error_response

log = logging.getLogger(__name__)

Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]
# Sees a request with a body when its head is complete, before the body is read: an answer
# refuses it (then the connection closes, the body unread); None lets the body be read.
Screen = Callable[[HttpRequest], "HttpResponse | None"]

REASONS: Final = {
    100: "Continue", 200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
    404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
    411: "Length Required", 413: "Content Too Large", 429: "Too Many Requests",
    431: "Request Header Fields Too Large", 499: "Client Closed Request",
    500: "Internal Server Error", 501: "Not Implemented", 503: "Service Unavailable",
    504: "Gateway Timeout",
}


@dataclass(frozen=True, slots=True)
class Limits:
    """What one request may cost the server before it is refused."""

    max_body_bytes: int
    max_head_bytes: int = 16 * 1024
    read_timeout_s: float = 30.0  # from a request's first byte to its last
    keepalive_s: float = 60.0  # an idle connection is closed after this long
    max_connections: int = 0  # connections held at once; later ones close at once (0: any)
    body_budget_bytes: int = 0  # body bytes all connections may hold together (0: any)


# After refusing a request the server keeps reading (and dropping) up to this much, for up to
# this long, before closing: a client still sending its body then sees the answer.
_LINGER_BYTES: Final = 64 * 1024 * 1024
_LINGER_S: Final = 2.0
# Each chunk of a chunked body costs the parser a callback, whatever its size: past the
# first _FREE_CHUNKS, a body whose chunks average under _MIN_CHUNK_BYTES is refused, so the
# loop time one request takes is in proportion to its bytes, as with Content-Length.
_FREE_CHUNKS: Final = 1024
_MIN_CHUNK_BYTES: Final = 1024


class _Refused(Exception):
    """A request refused while it is read (too large, malformed, no valid key): answered
    after the complete requests before it, then the connection closes."""

    def __init__(self, status: int, message: str,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.response = error_response(status, message, headers)

    @classmethod
    def answering(cls, response: HttpResponse) -> _Refused:
        refused = cls(response.status, "")
        refused.response = response
        return refused


class Connections:
    """The open connections of one server (for drain and ``max_connections``) and the body
    budget they share."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.open: set[HttpConnection] = set()
        self.closed = asyncio.Event()
        self.draining = False  # set on shutdown: a connection accepted late closes at once
        self.max_open = limits.max_connections if limits is not None else 0
        self.budget = BodyBudget(limits.body_budget_bytes if limits is not None else 0)

    def add(self, connection: HttpConnection) -> bool:
        """Count ``connection`` in; False when the server holds ``max_connections``."""
        if self.max_open and len(self.open) >= self.max_open:
            return False
        self.open.add(connection)
        self.closed.clear()
        return True

    def discard(self, connection: HttpConnection) -> None:
        self.open.discard(connection)
        if not self.open:
            self.closed.set()


class HttpConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive; pipelined requests are queued and answered in order."""

    def __init__(self, handler: Handler, limits: Limits, connections: Connections,
                 screen: Screen | None = None) -> None:
        self._handler = handler
        self._screen = screen
        self._budget = connections.budget
        self._held = 0  # body bytes this connection holds in the budget
        self._limits = limits
        self._connections = connections
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._peer = "-"
        self._queue: collections.deque[tuple[HttpRequest, bool]] = collections.deque()
        self._request: HttpRequest | None = None  # the one whose head is complete
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._writable = asyncio.Event()
        self._writable.set()
        self._closing = False
        self._reading = False  # between a request's first byte and its last
        self._refused: _Refused | None = None
        self._lingering = 0  # bytes still discarded after a refusal (lingering close)
        self._reset()

    def _reset(self) -> None:
        self._url = b""
        self._headers: dict[str, str] = {}
        self._head_bytes = 0
        # The first chunk is kept as it came; later ones join one growing buffer, so a body
        # of a million tiny chunks costs its bytes, not a million objects.
        self._body: bytes | bytearray = b""
        self._chunks = 0

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and len(peer) >= 2:
            self._peer = f"{peer[0]}:{peer[1]}"
        if not self._connections.add(self):
            self._transport.abort()  # max_connections: closed as it is accepted
            self._transport = None
            return
        if self._connections.draining:
            self._close()
            return
        self._arm(self._limits.keepalive_s, self._idle_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._connections.discard(self)
        self._queue.clear()
        self._budget.give(self._held)
        self._held = 0
        self._body = b""
        if self._task is not None and not self._task.done():
            self._task.cancel()  # the client is gone: nobody reads the answer
        self._transport = None

    def pause_writing(self) -> None:
        self._writable.clear()

    def resume_writing(self) -> None:
        self._writable.set()

    def data_received(self, data: bytes) -> None:
        if self._refused is not None:
            # Lingering close (and before it, while the complete requests ahead of the
            # refused one are answered): what the client still sends is read and dropped,
            # so it reads our answers instead of a reset; bounded in bytes and time.
            self._lingering -= len(data)
            if self._lingering < 0:
                self._close()
            return
        if not self._reading and self._task is None:
            self._disarm()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(_Refused(400, "protocol upgrades are not supported"))
        except httptools.HttpParserError as exc:
            refused = exc.__context__ if isinstance(exc.__context__, _Refused) else None
            self._refuse(refused or _Refused(400, "malformed HTTP request"))

    # -- httptools callbacks -------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reading = True
        self._reset()
        if self._task is None:
            self._arm(self._limits.read_timeout_s, self._read_timeout)

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_head(len(name) + len(value) + 4)
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        previous = self._headers.get(key)
        self._headers[key] = text if previous is None else f"{previous}, {text}"

    def on_headers_complete(self) -> None:
        url = httptools.parse_url(self._url)
        request = HttpRequest(
            method=self._parser.get_method().decode("ascii", "replace"),
            path=url.path.decode("latin-1"),
            query=(url.query or b"").decode("latin-1"),
            headers=self._headers,
            body=b"",
            peer=self._peer,
            peer_subject=self._peer_subject,
        )
        self._request = request
        length = self._headers.get("content-length", "").strip()
        declared = int(length) if length.isdigit() else 0
        if declared > self._limits.max_body_bytes:
            raise _Refused(413, f"the request body ({declared} bytes) is over the limit "
                                f"of {self._limits.max_body_bytes} bytes")
        if declared or "transfer-encoding" in self._headers:
            # Who sends it is known before a byte of the body is held (a request without a
            # valid key gets its 401 now), and so is whether the port can hold it.
            if self._screen is not None:
                refusal = self._screen(request)
                if refusal is not None:
                    raise _Refused.answering(refusal)
            budget = self._budget
            if budget.limit and budget.held + declared > budget.limit:
                raise self._over_budget()
        if self._headers.get("expect", "").lower() == "100-continue" and self._transport:
            self._transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        size = len(self._body) + len(body)
        if size > self._limits.max_body_bytes:
            raise _Refused(413, f"the request body is over the limit of "
                                f"{self._limits.max_body_bytes} bytes")
        if not self._budget.take(len(body)):
            raise self._over_budget()
        self._held += len(body)
        if not self._body:
            self._body = body
        elif isinstance(self._body, bytearray):
            self._body += body
        else:
            self._body = bytearray(self._body) + body

    def on_chunk_header(self) -> None:
        chunks = self._chunks = self._chunks + 1
        if chunks > _FREE_CHUNKS and (chunks - 1) * _MIN_CHUNK_BYTES > len(self._body):
            raise _Refused(400, f"the chunked body's chunks average under {_MIN_CHUNK_BYTES} "
                                f"bytes after {_FREE_CHUNKS} of them; send larger chunks")

    def on_message_complete(self) -> None:
        self._reading = False
        request = self._request
        if request is None:  # httptools completes only a message whose head it completed
            raise _Refused(400, "malformed HTTP request")
        self._request = None
        body = self._body
        request.body = body if isinstance(body, bytes) else bytes(body)
        self._queue.append((request, self._parser.should_keep_alive()))
        self._reset()
        if self._task is None:
            self._disarm()
            if self._transport is not None:
                self._transport.pause_reading()  # one request at a time per connection
            self._task = asyncio.get_running_loop().create_task(self._serve())

    # -- serving -------------------------------------------------------------------------

    async def _serve(self) -> None:
        while self._queue and self._transport is not None:
            request, keep_alive = self._queue.popleft()
            try:
                response = await self._handler(request)
            except Exception:
                log.exception("the REST handler failed")
                response = error_response(500, "internal error")
            finally:
                self._budget.give(len(request.body))
                self._held -= len(request.body)
            keep_alive = keep_alive and not self._closing
            self._write(response, keep_alive, head_only=request.method == "HEAD")
            if not keep_alive:
                self._close()
                return
            if not self._writable.is_set():
                await self._writable.wait()
        self._task = None
        if self._transport is None:
            return
        if self._refused is not None:  # every complete request before it is answered
            self._write(self._refused.response, keep_alive=False)
            # Reading was paused while they were served: what the client sent meanwhile is
            # read and dropped now, so closing does not reset the answers away.
            self._transport.resume_reading()
            self._linger()
            return
        if self._closing:
            self._close()
            return
        self._transport.resume_reading()
        if self._reading:  # a pipelined request is partly read: its clock runs again
            self._arm(self._limits.read_timeout_s, self._read_timeout)
        else:
            self._arm(self._limits.keepalive_s, self._idle_timeout)

    def _write(self, response: HttpResponse, keep_alive: bool, head_only: bool = False) -> None:
        """Send ``response``; to HEAD its head only, with the Content-Length a GET gets."""
        if self._transport is None:
            return
        lines = [
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        lines.extend(f"{name}: {value}" for name, value in response.headers)
        if not keep_alive:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        body = b"" if head_only else response.body
        self._transport.write(head + body if len(body) < 65536 else head)
        if len(body) >= 65536:
            self._transport.write(body)

    def _refuse(self, refused: _Refused) -> None:
        """Answer a request that could not be read, then close (its bytes are unparsed).
        Complete requests queued before it are answered first, in order (_serve ends with
        this answer); meanwhile what the client sends is dropped, bounded as when
        lingering."""
        if self._refused is not None:
            return
        self._refused = refused
        self._lingering = _LINGER_BYTES
        self._disarm()
        self._budget.give(len(self._body))  # the refused request's partial body
        self._held -= len(self._body)
        self._request, self._body = None, b""
        if self._task is None:
            self._write(refused.response, keep_alive=False)
            self._linger()

    def _linger(self) -> None:
        transport = self._transport
        if transport is None or not transport.can_write_eof():
            self._close()  # TLS cannot half-close
            return
        transport.write_eof()
        self._arm(_LINGER_S, self._close)

    def _close(self) -> None:
        self._disarm()
        if self._transport is not None:
            self._transport.close()

    def drain(self) -> None:
        """Server shutdown: an idle connection closes now; one serving a request closes
        after answering it (with Connection: close)."""
        self._closing = True
        if self._task is None:
            self._close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    # -- limits --------------------------------------------------------------------------

    def _over_budget(self) -> _Refused:
        return _Refused(503, f"the server holds its limit of {self._budget.limit} bytes of "
                             "request bodies; retry shortly", (("Retry-After", "1"),))

    def _count_head(self, size: int) -> None:
        self._head_bytes += size
        if self._head_bytes > self._limits.max_head_bytes:
            raise _Refused(431, f"the request line and headers are over the limit of "
                                f"{self._limits.max_head_bytes} bytes")

    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self._timer = asyncio.get_running_loop().call_later(seconds, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _read_timeout(self) -> None:
        self._timer = None
        self._refuse(_Refused(408, f"the request did not arrive within "
                                   f"{self._limits.read_timeout_s:g} seconds"))

    def _idle_timeout(self) -> None:
        self._timer = None
        self._close()

    def _peer_subject(self) -> str | None:
        cert: Any = self._transport.get_extra_info("peercert") if self._transport else None
        return subject_of(cert) if cert else None


# ssl's names for the attributes of a certificate subject, as RFC 2253 writes them.
_SHORT: Final = {
    "commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
    "countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
    "emailAddress": "emailAddress", "domainComponent": "DC",
}


def subject_of(cert: dict[str, Any]) -> str | None:
    """A verified peer certificate's subject, 'CN=acme,O=Acme' style (ssl's getpeercert
    form in, the form tenants files and gRPC use out)."""
    parts = []
    for rdn in cert.get("subject", ()):
        for name, value in rdn:
            escaped = str(value).replace("\\", "\\\\").replace(",", "\\,")
            parts.append(f"{_SHORT.get(name, name)}={escaped}")
    return ",".join(parts) or None
