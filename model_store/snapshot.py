"""Fingerprints of store folders: every file's relative path, size and modification time,
which tell whether anything under a model or version folder changed between two looks."""

from __future__ import annotations

import os
from pathlib import Path

Fingerprint = tuple[tuple[str, int, int], ...]


def fingerprint(folder: Path) -> Fingerprint | None:
    """The folder's fingerprint, or None when it does not exist. Files that vanish while
    being listed are left out; the next look sees the folder as it then is."""
    if not folder.is_dir():
        return None
    entries: list[tuple[str, int, int]] = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in files:
            path = Path(root) / name
            try:
                stat = path.stat()
            except OSError:
                continue
            entries.append((str(path.relative_to(folder)), stat.st_size, stat.st_mtime_ns))
        # An empty folder is a change too (a version folder just created).
        for name in dirs:
            entries.append((str((Path(root) / name).relative_to(folder)) + "/", 0, 0))
    return tuple(sorted(entries))


def store_fingerprints(root: Path) -> dict[str, Fingerprint]:
    """The fingerprint of every visible model folder directly under ``root``."""
    found: dict[str, Fingerprint] = {}
    if not root.is_dir():
        return found
    for child in root.iterdir():
        if child.is_dir() and not child.name.startswith("."):
            print_ = fingerprint(child)
            if print_ is not None:
                found[child.name] = print_
    return found
