"""``modelgate tenants``: create tenants, issue, rotate and revoke API keys, list them without
secrets. Every edit is validated, written to a temporary file and renamed over the old one."""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final, TextIO

from gateway.quota.rules import RULES
from gateway.tenancy.tenants import (
    TENANT_ID,
    TenantsFileError,
    hash_key,
    load_tenants,
    new_key,
    parse_tenants,
)

ENV_FILE: Final = "MODELGATE_TENANTS"
_BARE_KEY: Final = re.compile(r"[A-Za-z0-9_-]+")

Doc = dict[str, Any]


class AdminError(Exception):
    """A tenants command that cannot be done as asked."""


def add_parser(commands: Any) -> None:
    """Add ``tenants`` and its subcommands to the top-level CLI's subparsers."""
    parser = commands.add_parser("tenants", help="manage tenants and their API keys")
    parser.add_argument("--file", type=Path, help=f"tenants file (default: ${ENV_FILE})")
    sub = parser.add_subparsers(dest="action", required=True)
    create = sub.add_parser("create", help="add a tenant (no key yet: see issue-key)")
    create.add_argument("tenant")
    create.add_argument("--models", nargs="+", default=["*"],
                        help="model names or globs, NAME:VERSION to pin (default: *)")
    create.add_argument("--priority", type=int, default=0, help="batcher priority (0=default)")
    create.add_argument("--admin", action="store_true", help="may use model control RPCs")
    create.add_argument("--client-subject", help="require this mTLS client subject")
    for limit in RULES.fields():  # a flag per limit key (gateway/quota/rules.py)
        create.add_argument("--" + limit.name.replace("_", "-"), type=limit.kind,
                            dest=limit.name)
    issue = sub.add_parser("issue-key", help="issue a new key; printed once, stored hashed")
    issue.add_argument("tenant")
    rotate = sub.add_parser("rotate", help="issue a new key; older keys expire after a grace")
    rotate.add_argument("tenant")
    rotate.add_argument("--grace-s", type=float, default=3600.0,
                        help="seconds the older keys stay valid (default 3600)")
    revoke = sub.add_parser("revoke", help="revoke one key, or every key of a tenant")
    revoke.add_argument("tenant")
    revoke.add_argument("--key", help="key id (from list); default: all keys")
    sub.add_parser("list", help="tenants, limits and key ids; never secrets")


def run(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    out: TextIO = sys.stdout,
    clock: Callable[[], float] | None = None,
) -> int:
    """Carry out one ``tenants`` command; returns the exit code."""
    path = args.file or (Path(environ[ENV_FILE]) if environ.get(ENV_FILE) else None)
    if path is None:
        print(f"modelgate: error: give --file or set {ENV_FILE}", file=sys.stderr)
        return 2
    now = dt.datetime.fromtimestamp(
        clock() if clock else dt.datetime.now(dt.UTC).timestamp(), dt.UTC
    ).replace(microsecond=0)
    try:
        if args.action == "list":
            list_tenants(path, out, now)
            return 0
        with editing(path) as doc:
            message = _ACTIONS[args.action](doc, args, now)
    except (AdminError, TenantsFileError) as exc:
        print(f"modelgate: error: {exc}", file=sys.stderr)
        return 1
    print(message, file=out)
    return 0


def _tenant(doc: Doc, tenant_id: str) -> Doc:
    table = doc.setdefault("tenants", {}).get(tenant_id)
    if not isinstance(table, dict):
        raise AdminError(f"no tenant '{tenant_id}'")
    return table


def _add_key(table: Doc, tenant_id: str, now: dt.datetime) -> tuple[str, str]:
    key, key_id = new_key(tenant_id)
    table.setdefault("keys", []).append({"id": key_id, "hash": hash_key(key), "created": now})
    return key, key_id


def _create(doc: Doc, args: argparse.Namespace, now: dt.datetime) -> str:
    tenants = doc.setdefault("tenants", {})
    if not TENANT_ID.fullmatch(args.tenant):
        raise AdminError("tenant ids are 1-32 of a-z, 0-9 and '-'")
    if args.tenant in tenants:
        raise AdminError(f"tenant '{args.tenant}' exists")
    table: Doc = {"priority": args.priority, "admin": args.admin, "models": list(args.models)}
    if args.client_subject:
        table["client_subject"] = args.client_subject
    limits = {f.name: getattr(args, f.name) for f in RULES.fields()
              if getattr(args, f.name, None) is not None}
    if limits:
        table["limits"] = limits
    table["keys"] = []
    tenants[args.tenant] = table
    return f"created tenant '{args.tenant}' (no key yet: modelgate tenants issue-key)"


def _issue(doc: Doc, args: argparse.Namespace, now: dt.datetime) -> str:
    key, key_id = _add_key(_tenant(doc, args.tenant), args.tenant, now)
    return f"{key}\n# key id {key_id}: shown once, store it now; the file keeps only its hash"


def _rotate(doc: Doc, args: argparse.Namespace, now: dt.datetime) -> str:
    if args.grace_s < 0:
        raise AdminError("--grace-s must be >= 0")
    table = _tenant(doc, args.tenant)
    expires = now + dt.timedelta(seconds=args.grace_s)
    for entry in table.get("keys", []):
        # Keys that already expire sooner keep their earlier time.
        if not entry.get("revoked") and (entry.get("expires") is None
                                         or _aware(entry["expires"]) > expires):
            entry["expires"] = expires
    key, key_id = _add_key(table, args.tenant, now)
    return (f"{key}\n# new key id {key_id}: shown once; older keys stop working at "
            f"{_iso(expires)}")


def _revoke(doc: Doc, args: argparse.Namespace, now: dt.datetime) -> str:
    keys = _tenant(doc, args.tenant).get("keys", [])
    chosen = [k for k in keys if args.key is None or k.get("id") == args.key]
    if not chosen:
        raise AdminError(f"tenant '{args.tenant}' has no key '{args.key}'")
    for entry in chosen:
        entry["revoked"] = True
    return f"revoked {len(chosen)} key(s) of tenant '{args.tenant}'"


_ACTIONS: Final[dict[str, Callable[[Doc, argparse.Namespace, dt.datetime], str]]] = {
    "create": _create, "issue-key": _issue, "rotate": _rotate, "revoke": _revoke,
}


def list_tenants(path: Path, out: TextIO, now: dt.datetime) -> None:
    """Print each tenant, its limits and its keys' ids and states (never hashes)."""
    for tenant in load_tenants(path).values():
        limits = dict(tenant.limits.items())
        print(f"{tenant.id}  priority={tenant.priority} admin={str(tenant.admin).lower()} "
              f"models={','.join(_grant(g.pattern, g.version) for g in tenant.models) or '-'} "
              f"limits={json.dumps(limits, separators=(',', ':'))}", file=out)
        for key in tenant.keys:
            if key.revoked:
                state = "revoked"
            elif key.expires is None:
                state = "active"
            elif key.expires > now.timestamp():
                state = f"expires {_iso(dt.datetime.fromtimestamp(key.expires, dt.UTC))}"
            else:
                state = "expired"
            print(f"  key {key.id}  {state}", file=out)


def _grant(pattern: str, version: str | None) -> str:
    return f"{pattern}:{version}" if version else pattern


@contextlib.contextmanager
def editing(path: Path) -> Iterator[Doc]:
    """Lock, read, let the caller change the document, validate, then atomically replace
    the file: the gateway never sees a half-written file, two editors never interleave."""
    lock_path = path.with_name(path.name + ".lock")
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            doc: Doc = tomllib.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
        except tomllib.TOMLDecodeError as exc:
            raise TenantsFileError(f"tenants file {path}: not TOML: {exc}") from exc
        yield doc
        text = dump_toml(doc)
        try:
            parse_tenants(tomllib.loads(text))
        except TenantsFileError as exc:
            raise AdminError(f"the edit would make the file invalid: {exc}") from exc
        _replace(path, text)


def _replace(path: Path, text: str) -> None:
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def dump_toml(doc: Mapping[str, Any]) -> str:
    """TOML for the tenants document (tables, arrays of tables, scalars, string lists)."""
    lines = ["# modelgate tenants file: keys are stored as hashes only.",
             "# Edited by `modelgate tenants`; hand edits are fine, comments are not kept."]
    _dump_table(doc, [], lines)
    return "\n".join(lines) + "\n"


def _dump_table(table: Mapping[str, Any], path: list[str], lines: list[str]) -> None:
    tables: list[tuple[str, Any]] = []
    arrays: list[tuple[str, Any]] = []
    for key, value in table.items():
        if isinstance(value, dict):
            tables.append((key, value))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            arrays.append((key, value))
        else:
            lines.append(f"{_key(key)} = {_value(value)}")
    # Plain tables before arrays of tables, so a reader sees limits above the key list.
    for key, value in tables + arrays:
        sub_path = [*path, _key(key)]
        if isinstance(value, dict):
            if not any(isinstance(v, dict) for v in value.values()) or any(
                not isinstance(v, dict) for v in value.values()
            ):
                lines.extend(["", f"[{'.'.join(sub_path)}]"])
            _dump_table(value, sub_path, lines)
        else:
            for item in value:
                lines.extend(["", f"[[{'.'.join(sub_path)}]]"])
                _dump_table(item, sub_path, lines)


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else json.dumps(key)


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, dt.datetime):
        return _iso(_aware(value))
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    raise AdminError(f"cannot write {type(value).__name__} to the tenants file")


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
