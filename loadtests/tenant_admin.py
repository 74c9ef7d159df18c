"""``modelgate tenants`` run in-process on a tenants file, for the load tools that serve
with tenants (quotas, soak): the same parser and command a user runs."""

from __future__ import annotations

import io
from pathlib import Path

from gateway.process import cli
from gateway.tenancy import admin as tenant_admin


def tenants(path: Path, *argv: str) -> str:
    """What ``modelgate tenants --file PATH ARGV...`` prints; raises if it fails."""
    out = io.StringIO()
    args = cli._parser().parse_args(["tenants", "--file", str(path), *argv])
    if tenant_admin.run(args, {}, out) != 0:
        raise RuntimeError(f"tenants {' '.join(argv)} failed")
    return out.getvalue()
