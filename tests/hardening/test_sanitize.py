"""The log formatter and the client-facing path stripping of gateway/sanitize.py, and the
in-flight cap's bookkeeping."""

from __future__ import annotations

import logging

import pytest

from gateway.errors import OverloadedError
from gateway.request.inflight import InflightLimit
from gateway.sanitize import EscapingFormatter, escape_controls, strip_paths


def format_record(message: str, *args: object, exc: BaseException | None = None) -> str:
    formatter = EscapingFormatter("%(levelname)s %(name)s: %(message)s")
    record = logging.LogRecord("modelgate.test", logging.ERROR, __file__, 1, message, args,
                               (type(exc), exc, exc.__traceback__) if exc else None)
    return formatter.format(record)


def test_a_logged_request_field_stays_on_its_line() -> None:
    line = format_record("unknown model %s", "m\r\nINFO forged\u2028\x1b[2J\x00")
    assert line.splitlines() == [line]
    assert line == "ERROR modelgate.test: unknown model m\\r\\nINFO forged\\u2028\\x1b[2J\\x00"


def test_traceback_lines_are_indented_and_escaped() -> None:
    try:
        raise ValueError("bad\nERROR forged: line\x1b")
    except ValueError as exc:
        text = format_record("failed for %r", "x", exc=exc)
    head, *rest = text.split("\n")
    assert head == "ERROR modelgate.test: failed for 'x'"
    assert rest and all(line.startswith("    ") for line in rest)
    assert "\x1b" not in text


def test_strip_paths_keeps_file_names_and_leaves_urls_and_units() -> None:
    assert strip_paths("Load model from /srv/models/m/1/model.onnx failed:x") == (
        "Load model from model.onnx failed:x")
    assert strip_paths("cannot read '/a/b/config.pbtxt'") == "cannot read 'config.pbtxt'"
    for text in ("redis://127.0.0.1:6379/0", "50 rows/s", "http://h:4317/v1/traces",
                 "shape [1,4]"):
        assert strip_paths(text) == text
    assert escape_controls("plain") == "plain"


def test_the_inflight_limit_sheds_at_the_cap_and_frees_slots() -> None:
    ticks = iter(range(100))
    limit = InflightLimit(2, clock=lambda: float(next(ticks)))
    first, second = limit.enter(), limit.enter()
    with pytest.raises(OverloadedError) as caught:
        limit.enter()
    assert caught.value.trailers["retry-after-ms"] == "1"
    limit.leave(first)
    limit.leave(second)
    assert limit.inflight == 0 and limit.rejected == 1
    assert int(limit.retry_after_ms()) >= 1000  # the mean RPC took "seconds" on this clock
    unlimited = InflightLimit(0)
    for _ in range(1000):
        unlimited.enter()
