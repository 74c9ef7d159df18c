"""The server-wide budget of REST request body bytes: what every connection of one port
holds together (bodies being read, queued behind a pipelined request, or being served)."""

from __future__ import annotations


class BodyBudget:
    """Bytes taken as they arrive and given back when the request is answered or its
    connection closes; past ``limit`` (0: unlimited) a body is refused instead of grown.
    Single event loop: no lock."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, size: int) -> bool:
        """Hold ``size`` more bytes; False (holding nothing) when that would pass the limit."""
        if self.limit and self.held + size > self.limit:
            return False
        self.held += size
        return True

    def give(self, size: int) -> None:
        self.held -= size
