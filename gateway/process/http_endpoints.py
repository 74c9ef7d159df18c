"""The operator's HTTP port: /metrics (Prometheus text format), /healthz (live), /readyz
(ready) and the drift reports, served by a small HTTP/1.1 server on the gateway's own event loop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Final

from gateway.models.manager import ModelManager, VersionState
from gateway.monitoring.endpoint import JSON_TYPE, DriftEndpoint, encode
from gateway.observability.metrics import CONTENT_TYPE, Metrics
from gateway.sanitize import strip_paths

log = logging.getLogger(__name__)

_MAX_HEAD: Final = 8192
_READ_TIMEOUT_S: Final = 10.0
_REASONS: Final = {
    200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
    408: "Request Timeout", 431: "Request Header Fields Too Large", 503: "Service Unavailable",
}

# Readiness: (ready, details for the body).
ReadinessCheck = Callable[[], tuple[bool, dict[str, object]]]


class HttpEndpoints:
    """Serves GET/HEAD of the three paths; anything else is 404 or 405. One request per
    connection (Connection: close), which is all scrapers and probes need."""

    def __init__(self, metrics: Metrics, readiness: ReadinessCheck,
                 drift: DriftEndpoint | None = None) -> None:
        self._metrics = metrics
        self._readiness = readiness
        self._drift = drift
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        """Bind and serve; returns the bound port (``port`` 0 picks a free one)."""
        self._server = await asyncio.start_server(
            self._handle, host, port, limit=_MAX_HEAD, reuse_address=True
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, content_type, body, head_only = await self._respond(reader)
            reason = _REASONS.get(status, "OK")
            header = (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n"
                "Cache-Control: no-store\r\n\r\n"
            )
            writer.write(header.encode("ascii") + (b"" if head_only else body))
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client went away; nothing to answer
        except Exception:
            log.exception("HTTP endpoint failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _respond(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes, bool]:
        text = "text/plain; charset=utf-8"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
        except TimeoutError:
            return 408, text, b"request timeout\n", False
        except asyncio.LimitOverrunError:
            return 431, text, b"request head too large\n", False
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            return 400, text, b"bad request\n", False
        method, target = parts[0], parts[1].split("?", 1)[0]
        if self._drift is not None and target.startswith("/v2/models/"):
            if method not in ("GET", "HEAD"):
                return 405, text, b"method not allowed\n", False
            query = parts[1].split("?", 1)[1] if "?" in parts[1] else ""
            # A report merges windows of every feature; keep it off the event loop.
            answer = await asyncio.to_thread(self._drift.answer, target, query)
            if answer is None:
                return 404, text, b"not found\n", False
            return answer[0], JSON_TYPE, encode(answer[1]), method == "HEAD"
        if target not in ("/metrics", "/healthz", "/readyz"):
            return 404, text, b"not found\n", False
        if method not in ("GET", "HEAD"):
            return 405, text, b"method not allowed\n", False
        head_only = method == "HEAD"
        if target == "/metrics":
            # Collecting walks every family and reads /proc; keep it off the event loop.
            body = await asyncio.to_thread(self._metrics.exposition)
            return 200, CONTENT_TYPE, body, head_only
        if target == "/healthz":
            return 200, text, b"ok\n", head_only
        ready, details = self._readiness()
        body = json.dumps({"ready": ready, **details}, sort_keys=True).encode() + b"\n"
        return (200 if ready else 503), "application/json", body, head_only


def manager_readiness(manager: ModelManager, draining: Callable[[], bool]) -> ReadinessCheck:
    """Ready when loading finished, the gateway is not draining, and every version the store
    says should be served is READY (Triton's strict readiness); the body names the others."""

    def check() -> tuple[bool, dict[str, object]]:
        if draining():
            return False, {"reason": "shutting down"}
        if not manager.started:
            return False, {"reason": "loading models"}
        not_ready: dict[str, str] = {}
        for model in manager.models():
            # The reasons gRPC clients see: load errors quote paths, the probe gets file names.
            if model.error is not None:
                not_ready[model.name] = strip_paths(model.error)
            for number, version in sorted(model.versions.items()):
                name = f"{model.name}/{number}"
                if version.state is not VersionState.READY:
                    state = version.state.value
                    reason = strip_paths(version.reason) if version.reason else ""
                    not_ready[name] = f"{state}: {reason}" if reason else state
                elif version.runtime is not None and not version.runtime.ready():
                    not_ready[name] = "READY here, but no upstream has it ready"
        return not not_ready, {"not_ready": not_ready}

    return check
