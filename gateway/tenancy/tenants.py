"""The tenants file: TOML loading and validation, API key shape and hashing, what each tenant
may see and is limited to, and a registry that reloads the file when it changes."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import fnmatch
import hashlib
import hmac
import logging
import os
import re
import secrets
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gateway.quota.rules import RULES, Limits, On, Scope
from gateway.settings import SettingsError

log = logging.getLogger(__name__)

# Ids become metric labels and Redis keys: short, lower-case, no '_' (the key separator).
TENANT_ID: Final = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
KEY_ID: Final = re.compile(r"[a-z0-9]{1,16}")
# Metrics get one label per tenant; a bounded file keeps that label set bounded.
MAX_TENANTS: Final = 1000
KEY_PREFIX: Final = "mg_"
_ALPHABET: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_SECRET: Final = re.compile(r"[A-Za-z0-9]{20,128}")
_HASH: Final = re.compile(r"sha256:[0-9a-f]{64}")
_GRANT: Final = re.compile(
    r"(?P<name>[A-Za-z0-9_.*?\[\]\-]{1,128})(?::(?P<version>[0-9]{1,18}|[A-Za-z][A-Za-z0-9_\-]{0,63}))?"
)
_TENANT_FIELDS: Final = {
    "priority", "admin", "models", "limits", "model_limits", "client_subject", "keys",
    "description",
}
_KEY_FIELDS: Final = {"id", "hash", "created", "expires", "revoked"}
_MEMO_SIZE: Final = 4096


class TenantsFileError(SettingsError):
    """The tenants file cannot be read or is invalid; the message names the entry."""


def hash_key(key: str) -> str:
    """The stored form of an API key. Keys carry 238 random bits, so a plain SHA-256 is as
    strong as a slow hash here and keeps authentication cheap on every request."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key(tenant_id: str) -> tuple[str, str]:
    """A fresh key ``mg_<tenant>_<secret>`` (greppable by leaked-secret scanners) and its id."""
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(40))
    return f"{KEY_PREFIX}{tenant_id}_{secret}", secrets.token_hex(4)


def key_tenant(key: str) -> str | None:
    """The tenant id a well-formed key names, or None for anything else."""
    if not key.startswith(KEY_PREFIX):
        return None
    tenant_id, sep, secret = key[len(KEY_PREFIX):].rpartition("_")
    if not sep or not TENANT_ID.fullmatch(tenant_id) or not _SECRET.fullmatch(secret):
        return None
    return tenant_id


@dataclass(frozen=True, slots=True)
class ApiKey:
    """One stored key: its hash only. ``expires`` (epoch seconds) is set by a rotation."""

    id: str
    hash: str
    created: float
    expires: float | None = None
    revoked: bool = False

    def valid_at(self, now: float) -> bool:
        return not self.revoked and (self.expires is None or now < self.expires)


@dataclass(frozen=True, slots=True)
class ModelGrant:
    """A model name or glob pattern, optionally pinned to one version number or label."""

    pattern: str
    version: str | None = None

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


@dataclass(frozen=True, slots=True)
class Tenant:
    """A tenant: what it may see, how it is limited, its batcher priority (0 = default)."""

    id: str
    priority: int = 0
    admin: bool = False
    models: tuple[ModelGrant, ...] = ()
    limits: Limits = field(default_factory=Limits)
    model_limits: tuple[tuple[str, Limits], ...] = ()
    client_subject: str | None = None
    keys: tuple[ApiKey, ...] = ()
    # Per model name: its grants and scopes, worked out once (the patterns are fnmatch
    # globs); bounded, since the names come from requests.
    _memo: dict[tuple[str, str], Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def key_matches(self, key_hash: str, now: float) -> bool:
        """Whether ``key_hash`` is one of this tenant's valid keys; every stored hash is
        compared in constant time, so timing says nothing about which one matched."""
        found = False
        for key in self.keys:
            if hmac.compare_digest(key.hash, key_hash) and key.valid_at(now):
                found = True
        return found

    @property
    def unrestricted(self) -> bool:
        """Whether every model and version is this tenant's (a bare ``*`` grant)."""
        memo = self._memo.get(("unrestricted", ""))
        if memo is None:
            memo = any(g.pattern == "*" and g.version is None for g in self.models)
            self._remember(("unrestricted", ""), memo)
        return bool(memo)

    def priority_for(self, levels: int) -> int:
        """The tenant's priority on a model with ``levels`` priority levels (1 highest):
        clamped to the lowest level, so a tenant's setting never makes a request invalid."""
        if self.priority == 0 or levels == 0:
            return 0
        return min(self.priority, levels)

    def _grants(self, name: str) -> tuple[ModelGrant, ...]:
        memo = self._memo.get(("grants", name))
        if memo is None:
            memo = tuple(g for g in self.models if g.matches(name))
            self._remember(("grants", name), memo)
        return memo

    def _remember(self, key: tuple[str, str], value: Any) -> None:
        if len(self._memo) < _MEMO_SIZE:
            self._memo[key] = value

    def can_see(self, name: str) -> bool:
        return bool(self._grants(name))

    def allows(self, name: str, version: str) -> bool:
        """Whether the tenant may use ``version`` ('' = the default) of model ``name``."""
        grants = self._grants(name)
        if not grants:
            return False
        if any(g.version is None for g in grants):
            return True
        return _normal(version) in {_normal(g.version or "") for g in grants}

    def effective_version(self, name: str, version: str) -> str:
        """The version a request runs: as asked, or for an empty one on a tenant pinned to
        versions, its highest pinned number (else its first pinned label)."""
        if version:
            return version
        grants = self._grants(name)
        if not grants or any(g.version is None for g in grants):
            return version
        pins = [g.version for g in grants if g.version]
        numbers = [int(p) for p in pins if p.isdigit()]
        return str(max(numbers)) if numbers else pins[0]

    def visible_versions(self, name: str, versions: Sequence[int]) -> list[int]:
        """The numbered versions of ``name`` this tenant may see (label pins show all: the
        label's target is decided by the model manager)."""
        grants = self._grants(name)
        if not grants:
            return []
        if any(g.version is None or not g.version.isdigit() for g in grants):
            return list(versions)
        pinned = {int(g.version or 0) for g in grants}
        return [v for v in versions if v in pinned]

    def scopes(self, model: str) -> tuple[Scope, ...]:
        """What a request to ``model`` is charged against: the tenant, then the model."""
        memo = self._memo.get(("scopes", model))
        if memo is None:
            memo = self._scopes(model)
            self._remember(("scopes", model), memo)
        return memo

    def stream_scopes(self) -> tuple[Scope, ...]:
        """What opening a stream is charged against: the tenant, if it limits streams."""
        memo = self._memo.get(("streams", ""))
        if memo is None:
            memo = ((Scope(f"t:{self.id}", self.limits),) if self.limits.charges(On.STREAM)
                    else ())
            self._remember(("streams", ""), memo)
        return tuple(memo)

    def _scopes(self, model: str) -> tuple[Scope, ...]:
        out: list[Scope] = []
        if self.limits.charges(On.REQUEST):
            out.append(Scope(f"t:{self.id}", self.limits))
        for pattern, limits in self.model_limits:
            if fnmatch.fnmatchcase(model, pattern):
                out.append(Scope(f"m:{self.id}:{model}", limits, f"model={model}"))
                break
        return tuple(out)


def _normal(version: str) -> str:
    return str(int(version)) if version.isdigit() else version


# Open mode (no tenants file): one anonymous tenant that sees everything, without limits.
ANONYMOUS: Final = Tenant(id="anonymous", admin=True, models=(ModelGrant("*"),))


def load_tenants(path: Path) -> dict[str, Tenant]:
    """Read and validate a tenants file; raises TenantsFileError naming what is wrong."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except PermissionError as exc:
        raise TenantsFileError(_unreadable(path)) from exc
    except OSError as exc:
        raise TenantsFileError(f"tenants file {path}: cannot read: {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise TenantsFileError(f"tenants file {path}: not TOML: {exc}") from exc
    try:
        return parse_tenants(data)
    except TenantsFileError as exc:
        raise TenantsFileError(f"tenants file {path}: {exc}") from None


def _unreadable(path: Path) -> str:
    """Why this process cannot read ``path`` and how to fix it: `modelgate tenants` writes
    the file 0600 for its owner, and a container's user is usually another uid."""
    try:
        info = path.stat()
        owner = f"owned by uid {info.st_uid} gid {info.st_gid}, mode {info.st_mode & 0o777:04o}"
    except OSError:
        owner = "its folder cannot be searched"
    return (f"tenants file {path}: permission denied ({owner}) for this process, uid "
            f"{os.getuid()} gid {os.getgid()}; make it readable by that user "
            f"(chown {os.getuid()} {path.name}) or its group (chgrp {os.getgid()} {path.name} "
            f"&& chmod g+r {path.name})")


def parse_tenants(data: Mapping[str, Any]) -> dict[str, Tenant]:
    """Validate the parsed TOML document ``{tenants: {<id>: {...}}}``."""
    extra = set(data) - {"tenants"}
    if extra:
        raise TenantsFileError(f"unknown top-level key(s): {', '.join(sorted(extra))}")
    tables = data.get("tenants", {})
    if not isinstance(tables, dict):
        raise TenantsFileError("'tenants' must be a table of tenants")
    if len(tables) > MAX_TENANTS:
        raise TenantsFileError(f"at most {MAX_TENANTS} tenants are allowed")
    tenants: dict[str, Tenant] = {}
    for tenant_id, raw in tables.items():
        where = f"tenant '{tenant_id}'"
        if not TENANT_ID.fullmatch(tenant_id) or tenant_id == ANONYMOUS.id:
            raise TenantsFileError(
                f"{where}: ids are 1-32 of a-z, 0-9 and '-', starting with a letter or digit"
            )
        tenants[tenant_id] = _parse_tenant(tenant_id, _table(raw, where, _TENANT_FIELDS), where)
    return tenants


def _table(raw: Any, where: str, allowed: set[str] | Mapping[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise TenantsFileError(f"{where}: must be a table")
    unknown = set(raw) - set(allowed)
    if unknown:
        raise TenantsFileError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    return raw


def _parse_tenant(tenant_id: str, raw: dict[str, Any], where: str) -> Tenant:
    priority = raw.get("priority", 0)
    if isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 255:
        raise TenantsFileError(f"{where}: priority must be an integer 0..255")
    admin = raw.get("admin", False)
    if not isinstance(admin, bool):
        raise TenantsFileError(f"{where}: admin must be true or false")
    models = raw.get("models", [])
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise TenantsFileError(f"{where}: models must be a list of strings")
    grants = []
    for text in models:
        match = _GRANT.fullmatch(text)
        if match is None:
            raise TenantsFileError(f"{where}: model '{text}' is not NAME, GLOB or NAME:VERSION")
        grants.append(ModelGrant(match["name"], match["version"]))
    subject = raw.get("client_subject")
    if subject is not None and (not isinstance(subject, str) or not subject):
        raise TenantsFileError(f"{where}: client_subject must be a non-empty string")
    model_limits = raw.get("model_limits", {})
    if not isinstance(model_limits, dict):
        raise TenantsFileError(f"{where}: model_limits must be a table of model patterns")
    keys = raw.get("keys", [])
    if not isinstance(keys, list):
        raise TenantsFileError(f"{where}: keys must be an array of tables ([[...keys]])")
    return Tenant(
        id=tenant_id,
        priority=priority,
        admin=admin,
        models=tuple(grants),
        limits=_parse_limits(raw.get("limits", {}), f"{where} limits"),
        model_limits=tuple(
            (pattern,
             _parse_limits(value, f"{where} model_limits.{pattern}", model_scope=True))
            for pattern, value in model_limits.items()
        ),
        client_subject=subject,
        keys=tuple(_parse_key(k, f"{where} key {n}") for n, k in enumerate(keys, 1)),
    )


def _parse_limits(raw: Any, where: str, model_scope: bool = False) -> Limits:
    """One limits table: the keys of the limit rules (RULES), each checked as its rule says."""
    fields = RULES.fields()
    table = _table(raw, where, {f.name for f in fields})
    values: dict[str, Any] = {}
    for field_ in fields:
        name, kind = field_.name, field_.kind
        value = table.get(name)
        if value is None:
            continue
        ok = not isinstance(value, bool) and isinstance(value, (int, float) if kind is float
                                                        else int)
        if not ok or value <= 0 or value > 10**9:
            raise TenantsFileError(f"{where}: {name} must be a positive number up to 1e9")
        values[name] = kind(value)
    for rule in RULES:
        problem = rule.validate(values, where)
        if problem is not None:
            raise TenantsFileError(problem)
        if model_scope and not rule.per_model and rule.name in values:
            raise TenantsFileError(f"{where}: {rule.name} is counted per tenant only: set "
                                   "it in the tenant's limits")
    return Limits(**values)


def _parse_key(raw: Any, where: str) -> ApiKey:
    table = _table(raw, where, _KEY_FIELDS)
    key_id, key_hash = table.get("id"), table.get("hash")
    if not isinstance(key_id, str) or not KEY_ID.fullmatch(key_id):
        raise TenantsFileError(f"{where}: id must be 1-16 of a-z, 0-9")
    if not isinstance(key_hash, str) or not _HASH.fullmatch(key_hash):
        raise TenantsFileError(f"{where}: hash must be 'sha256:' and 64 hex digits")
    revoked = table.get("revoked", False)
    if not isinstance(revoked, bool):
        raise TenantsFileError(f"{where}: revoked must be true or false")
    return ApiKey(
        id=key_id,
        hash=key_hash,
        created=_epoch(table.get("created"), f"{where} created") or 0.0,
        expires=_epoch(table.get("expires"), f"{where} expires"),
        revoked=revoked,
    )


def _epoch(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return float(value.timestamp())
    raise TenantsFileError(f"{where}: must be a TOML date-time like 2030-01-01T00:00:00Z")


def _signature(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


class TenantRegistry:
    """The tenants now in force. Reloads the file when it changes (edits are atomic
    renames, so a changed inode, size or mtime shows them); a bad new file is logged and
    the previous tenants stay, so no request is dropped or let through by a broken edit."""

    def __init__(self, path: Path, poll_s: float = 1.0) -> None:
        self.path = path
        self.poll_s = poll_s
        self._signature = _signature(path)
        self.tenants: Mapping[str, Tenant] = load_tenants(path)
        self._task: asyncio.Task[None] | None = None

    def reload_if_changed(self) -> bool:
        """Reload when the file changed; returns whether new tenants are in force."""
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        try:
            tenants = load_tenants(self.path)
        except TenantsFileError as exc:
            log.error("keeping the previous tenants: %s", exc)
            return False
        self.tenants = tenants
        log.info("tenants file reloaded: %d tenants", len(tenants))
        return True

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch(), name="tenants")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            await asyncio.to_thread(self.reload_if_changed)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
