"""The access log: one JSON object per line per request (who, what, outcome, how long),
written off the event loop. Never holds keys or tensor data."""

from __future__ import annotations

import json
import logging
import logging.handlers
import queue
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

# Every string field is cut to this length: a client controls most of them.
MAX_FIELD: Final = 256


@dataclass(frozen=True, slots=True)
class AccessEntry:
    """One answered RPC. Durations in microseconds; None where it does not apply."""

    method: str
    code: str
    peer: str
    tenant: str | None = None
    model: str | None = None
    version: str | None = None
    rows: int | None = None
    batch_rows: int | None = None
    queue_us: int | None = None
    compute_us: int | None = None
    total_us: int | None = None
    trace_id: str | None = None
    protocol: str = "grpc"  # grpc, grpc_stream or http


def format_entry(entry: AccessEntry, now: float | None = None) -> str:
    """The entry as one line of JSON. json.dumps escapes CR, LF and every other control
    character, and ensure_ascii escapes the rest (U+2028 included), so a field can never
    break a line or forge another entry."""
    stamp = time.time() if now is None else now
    record: dict[str, object] = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp))
        + f".{int(stamp % 1 * 1000):03d}Z"
    }
    for key, value in asdict(entry).items():
        record[key] = value[:MAX_FIELD] if isinstance(value, str) else value
    return json.dumps(record, ensure_ascii=True, separators=(",", ":"))


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return str(record.msg)


class AccessLog:
    """Writes entries to stdout ('-') or appends them to a file, from a background thread
    so a slow disk never stalls the event loop."""

    def __init__(self, destination: str) -> None:
        handler: logging.Handler
        if destination == "-":
            handler = logging.StreamHandler(sys.stdout)
        else:
            path = Path(destination).expanduser()
            path.parent.mkdir(parents=True, exist_ok=True)
            handler = logging.FileHandler(path, encoding="utf-8")
        handler.setFormatter(_LineFormatter())
        self._handler = handler
        self._queue: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._listener = logging.handlers.QueueListener(self._queue, handler)
        self._listener.start()

    def write(self, entry: AccessEntry) -> None:
        line = format_entry(entry)
        self._queue.put(
            logging.LogRecord("modelgate.access", logging.INFO, "", 0, line, None, None)
        )

    def close(self) -> None:
        """Write what is queued and release the file."""
        self._listener.stop()
        self._handler.close()
