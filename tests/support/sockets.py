"""Which TCP sockets a process holds, read from /proc (Linux): to tell which worker of a
supervisor accepted a test's connections, and on which port each worker serves metrics."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple

LISTEN = "0A"
ESTABLISHED = "01"


class Socket(NamedTuple):
    local_port: int
    remote_port: int
    state: str


def tcp_sockets(pid: int | str = "self") -> list[Socket]:
    """The TCP sockets (IPv4 and IPv6) among ``pid``'s open files."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            link = os.readlink(fd)
            if link.startswith("socket:["):
                inodes.add(link[len("socket:["):-1])
    found = []
    for table in ("tcp", "tcp6"):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes:
                found.append(Socket(int(fields[1].rsplit(":", 1)[1], 16),
                                    int(fields[2].rsplit(":", 1)[1], 16), fields[3]))
    return found
