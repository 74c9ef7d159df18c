"""A port of a few read-only paths (the metrics port: /metrics, the probes, the drift
reports): exact paths and path prefixes mapped to endpoints, read with GET or HEAD; served by
the REST port's listener and connection, so it has the same limits, timeouts and drain."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Final

from gateway.http.messages import HttpRequest, HttpResponse

Endpoint = Callable[[HttpRequest], Awaitable[HttpResponse]]

TEXT: Final = "text/plain; charset=utf-8"
READ: Final = frozenset({"GET", "HEAD"})  # HEAD: the connection sends the head only
# Probes and scrapes must see the state of now, never a cache's copy.
NO_STORE: Final = ("Cache-Control", "no-store")


async def alive(request: HttpRequest) -> HttpResponse:
    """/healthz: the process answers, so it lives."""
    return HttpResponse(200, b"ok\n", TEXT)


def not_found() -> HttpResponse:
    """The answer to a path the table (or a prefix's endpoint) does not serve."""
    return HttpResponse(404, b"not found\n", TEXT)


class RouteTable:
    """Routes a request by its path (``exact`` first, then the first prefix it starts with)
    and answers 404 for no route, 405 for a method other than GET and HEAD; every answer
    carries ``Cache-Control: no-store``."""

    def __init__(self, exact: Mapping[str, Endpoint],
                 prefixes: Sequence[tuple[str, Endpoint]] = ()) -> None:
        self._exact = dict(exact)
        self._prefixes = tuple(prefixes)

    def endpoint(self, path: str) -> Endpoint | None:
        found = self._exact.get(path)
        if found is not None:
            return found
        return next((serve for prefix, serve in self._prefixes if path.startswith(prefix)),
                    None)

    async def handle(self, request: HttpRequest) -> HttpResponse:
        """The listener's handler."""
        endpoint = self.endpoint(request.path)
        if endpoint is None:
            response = not_found()
        elif request.method not in READ:
            response = HttpResponse(405, b"method not allowed\n", TEXT, (("Allow", "GET, HEAD"),))
        else:
            response = await endpoint(request)
        response.headers = (*response.headers, NO_STORE)
        return response
