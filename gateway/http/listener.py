"""An HTTP port's listening socket (the REST port, the metrics port, the workers' merged
metrics port) and the limits they share: binds (SO_REUSEPORT among the workers of one
supervisor), wraps connections in TLS when certificates are set (client certificates
required with a client CA: mTLS; changed files are picked up at the next handshake), and
drains on shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from pathlib import Path

from gateway.http.connection import Connections, Handler, HttpConnection, Limits, Screen
from gateway.settings import Settings

log = logging.getLogger(__name__)


def port_limits(settings: Settings, max_body_bytes: int) -> Limits:
    """The limits of every HTTP port a process serves (REST, metrics, the workers' merged
    metrics): one read timeout, keep-alive, connection cap and body budget from the
    settings; ``max_body_bytes`` is the port's largest body (0: the port takes none)."""
    return Limits(max_body_bytes=max_body_bytes,
                  read_timeout_s=settings.http_read_timeout_s,
                  keepalive_s=settings.http_keepalive_s,
                  max_connections=settings.max_connections,
                  body_budget_bytes=settings.http_body_budget_bytes)


class TlsFiles:
    """A server SSLContext from PEM files, reloaded into the same context when they change
    (checked as each connection is accepted); a broken new file keeps the old ones."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_2
        self._signature = self._stat()
        self._load()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        out = []
        for path in (self.cert, self.key, self.client_ca):
            try:
                st = os.stat(path) if path is not None else None
                out.append((st.st_ino, st.st_mtime_ns, st.st_size) if st else (0, 0, 0))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _load(self) -> None:
        self.context.load_cert_chain(self.cert, self.key)
        if self.client_ca is not None:
            self.context.load_verify_locations(self.client_ca)
            self.context.verify_mode = ssl.CERT_REQUIRED

    def refresh(self) -> None:
        signature = self._stat()
        if signature == self._signature:
            return
        try:
            self._load()
        except (OSError, ssl.SSLError) as exc:
            log.error("REST port: keeping the previous TLS certificates: %s", exc)
            return
        self._signature = signature
        log.info("REST port: TLS certificates reloaded from %s", self.cert)


class HttpListener:
    """Serves ``handler`` on one port until stopped."""

    def __init__(self, handler: Handler, limits: Limits, tls: TlsFiles | None = None,
                 screen: Screen | None = None) -> None:
        self._handler = handler
        self._limits = limits
        self._tls = tls
        self._screen = screen
        self._connections = Connections(limits)
        self._server: asyncio.Server | None = None
        self.port = 0

    def _connection(self) -> HttpConnection:
        if self._tls is not None:
            self._tls.refresh()  # applies to the handshakes after this one
        return HttpConnection(self._handler, self._limits, self._connections, self._screen)

    async def start(self, host: str, port: int, reuse_port: bool) -> int:
        """Bind and serve; returns the bound port (``port`` 0 picks a free one). Raises
        OSError when the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            self._connection, host, port, reuse_port=reuse_port or None,
            ssl=self._tls.context if self._tls is not None else None, backlog=1024,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    @property
    def handler(self) -> Handler:
        """What each connection calls with a complete request (loadtests drive it)."""
        return self._handler

    @property
    def open_connections(self) -> int:
        return len(self._connections.open)

    @property
    def body_bytes_held(self) -> int:
        """Request body bytes the port's connections hold now (the body budget's count)."""
        return self._connections.budget.held

    async def stop(self, grace: float) -> None:
        """Stop accepting; idle connections close now, requests in progress get ``grace``
        seconds to be answered, then what is left is cut."""
        if self._server is None:
            return
        self._server.close()
        self._connections.draining = True
        for connection in list(self._connections.open):
            connection.drain()
        if self._connections.open:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connections.closed.wait(), grace)
        for connection in list(self._connections.open):
            connection.abort()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 2.0)
        self._server = None
