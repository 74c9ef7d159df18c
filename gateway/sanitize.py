"""What leaves the process carrying client-chosen or internal text: log lines with every
control character escaped, and client-facing messages without absolute file paths."""

from __future__ import annotations

import logging
import re
from typing import Final

# C0/C1 controls, DEL and the Unicode line separators: each could start a forged log line.
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
# An absolute path of two or more components ('/srv/models/m/1/model.onnx'), not the tail
# of a URL ('redis://h:1/0') or of a word ('rows/s').
_ABSOLUTE_PATH: Final = re.compile(r"(?<![\w.~:/-])/(?:[^\s/'\"()<>:,;]+/)+([^\s/'\"()<>:,;]*)")


def escape_controls(text: str) -> str:
    """``text`` with every control character written as a Python escape (``\\r``, ``\\x1b``)."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def echoed(text: str, limit: int = 128) -> str:
    """A client-chosen name as an error message quotes it: at most ``limit`` characters,
    every control or non-ASCII character written as a Python escape."""
    return text[:limit].encode("unicode_escape").decode("ascii")


def strip_paths(text: str) -> str:
    """``text`` with each absolute path cut to its last component: clients learn which file
    (``model.onnx``) failed, never where the store or the gateway lives."""
    return _ABSOLUTE_PATH.sub(lambda m: m.group(1) or "<path>", text)


class EscapingFormatter(logging.Formatter):
    """A log record is one line: control characters in the message (which may quote
    request fields, tenant settings or exception text) are escaped, and every line of an
    attached traceback is indented, so none can pass for a record of its own."""

    def format(self, record: logging.LogRecord) -> str:
        saved_msg, saved_args = record.msg, record.args
        record.msg, record.args = escape_controls(record.getMessage()), None
        saved_text, record.exc_text = record.exc_text, None
        try:
            line = super().format(record)
        finally:
            record.msg, record.args = saved_msg, saved_args
            record.exc_text = saved_text
        head, newline, rest = line.partition("\n")
        if not newline:
            return head
        tail = [escape_controls(part) for part in rest.split("\n")]
        return head + "".join("\n    " + part for part in tail)


def escape_log_lines(logger: logging.Logger | None = None) -> None:
    """Give every handler of ``logger`` (default: the root logger) an EscapingFormatter
    that keeps the handler's format."""
    target = logger or logging.getLogger()
    for handler in target.handlers:
        current = handler.formatter
        handler.setFormatter(EscapingFormatter(
            current._fmt if current is not None else None,
            current.datefmt if current is not None else None,
        ))
