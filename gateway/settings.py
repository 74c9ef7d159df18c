"""Settings, built once at start-up from defaults, a TOML file, MODELGATE_* environment
variables and command-line flags (later wins), checked, then passed down."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import tomllib
import types
import typing
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

from runtimes.upstreams import UpstreamConfig, parse_upstream

ENV_PREFIX: Final = "MODELGATE_"


class SettingsError(Exception):
    """A setting with a bad value; the message names the setting, where it came from and
    what is wrong. ``partial``: the settings built from the values that were valid (the
    defaults in place of the others), so a check can go on to what they point at."""

    def __init__(self, message: str, partial: Settings | None = None) -> None:
        super().__init__(message)
        self.partial = partial


def demo_store() -> Path:
    """The demo model store shipped inside the package."""
    return Path(str(resources.files("gateway") / "demo_store"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the gateway. Field metadata gives each one's parser and help."""

    store: Path = field(default_factory=demo_store, metadata={"help": "model store folder"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC port (0 = any free port)"})
    metrics_port: int = field(default=8002, metadata={
        "help": "HTTP port for /metrics, /healthz, /readyz (one port for all --workers, merged)"})
    http_port: int | None = field(
        default=None, metadata={"help": "KServe V2 HTTP/REST port (Triton's is 8000; 0 = any "
                                "free port; unset: no REST port)"}
    )
    http_read_timeout_s: float = field(
        default=30.0, metadata={"help": "seconds a REST request may take to arrive, from its "
                                "first byte to its last; slower clients get 408"}
    )
    http_keepalive_s: float = field(
        default=60.0, metadata={"help": "seconds an idle REST keep-alive connection stays open"}
    )
    grace_period_s: float = field(
        default=10.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"}
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "largest gRPC message received or sent"}
    )
    max_inflight_requests: int = field(
        default=256, metadata={"help": "inference requests served at once (ModelInfer, REST "
                               "infer, each ModelStreamInfer message; an open stream holds "
                               "none); more are answered RESOURCE_EXHAUSTED at once "
                               "(0: unlimited)"}
    )
    max_concurrent_streams: int = field(
        default=64, metadata={"help": "RPCs (HTTP/2 streams) open at once on one client "
                              "connection; a client's further calls wait in the client "
                              "(0: gRPC's default, unlimited)"}
    )
    stream_max_inflight: int = field(
        default=128, metadata={"help": "ModelStreamInfer messages one stream may have read "
                               "and not yet answered; at the bound the stream is not read "
                               "(HTTP/2 flow control pushes back on the client)"}
    )
    max_connections: int = field(
        default=1000, metadata={"help": "client connections held at once, per port (gRPC and "
                                "REST); further ones are closed as they are accepted "
                                "(0: unlimited)"}
    )
    http_body_budget_bytes: int = field(
        default=256 * 1024 * 1024, metadata={
            "help": "REST request body bytes all connections may hold at once; a body that "
                    "would pass it is refused 503 with Retry-After (0: unlimited)"}
    )
    max_open_streams: int = field(
        default=1024, metadata={"help": "ModelStreamInfer streams open at once in a serving "
                                "process; more are refused RESOURCE_EXHAUSTED (0: unlimited)"}
    )
    stream_idle_s: float = field(
        default=300.0, metadata={"help": "seconds a ModelStreamInfer stream may stay open with "
                                 "no message in flight; then it ends UNAVAILABLE (0: never)"}
    )
    device: str = field(default="auto", metadata={"help": "onnxruntime device: auto|cpu|cuda"})
    intra_op_threads: int = field(
        default=1, metadata={"help": "onnxruntime intra-op threads per session"}
    )
    inter_op_threads: int = field(
        default=1, metadata={"help": "onnxruntime inter-op threads per session"}
    )
    staged_batches: int = field(
        default=1, metadata={"help": "batches the dynamic batcher hands each model instance "
                             "at once: 1 forms the next batch when an instance frees "
                             "(Triton's rule); 2 forms it while one runs, so the instance "
                             "starts it without waiting for the event loop (more throughput "
                             "for compute-bound models, smaller batches under load)"}
    )
    inline_compute_us: int = field(
        default=200, metadata={"help": "ONNX Runtime runs that take less than this many "
                               "microseconds (a moving average) run on the event loop "
                               "instead of a worker thread when no other request is in "
                               "flight, and under a quarter of it always (0: always a "
                               "worker thread)"}
    )
    event_loop: str = field(
        default="auto", metadata={"help": "asyncio event loop: auto (uvloop when installed), "
                                  "uvloop or asyncio"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG|INFO|WARNING|ERROR"})
    workers: str = field(
        default="1", metadata={"help": "serving processes sharing the port (auto = CPU count)"}
    )
    poll_interval: float = field(
        default=0.0, metadata={"help": "seconds between polls of the model store for new, "
                               "changed or removed versions (0: off)"}
    )
    enable_model_control: bool = field(
        default=False, metadata={"help": "allow admin tenants RepositoryModelLoad/Unload"}
    )
    otlp_endpoint: str = field(
        default="", metadata={"help": "OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317 "
                              "(empty: the OTEL_EXPORTER_OTLP_* variables; none set: tracing off)"}
    )
    trace_sampling_ratio: float = field(
        default=-1.0, metadata={"help": "fraction of new traces sampled, 0..1, parent-based "
                                "(-1: OTEL_TRACES_SAMPLER[_ARG], default all)"}
    )
    access_log: str = field(
        default="", metadata={"help": "JSON access log: empty = off, '-' = stdout, else a file"}
    )
    tenants: Path | None = field(
        default=None, metadata={"help": "tenants file (TOML: keys, models, limits); none: open"}
    )
    allow_anonymous: bool = field(
        default=False, metadata={"help": "allow serving a non-loopback address without tenants"}
    )
    allow_empty_store: bool = field(
        default=False, metadata={"help": "start with a store that holds no model (models come "
                                 "later: the poller, the repository API, Triton discovery)"}
    )
    redis_url: str = field(
        default="", metadata={"help": "share quotas through Redis: redis://, rediss://, "
                              "unix:// (empty: in-process quotas)"}
    )
    redis_failure_mode: str = field(
        default="fail-open", metadata={"help": "Redis unreachable: fail-open (local per-process "
                                       "limits) or fail-closed (UNAVAILABLE)"}
    )
    tls_cert: Path | None = field(
        default=None, metadata={"help": "PEM server certificate chain (TLS on the gRPC port)"}
    )
    tls_key: Path | None = field(default=None, metadata={"help": "PEM server private key"})
    tls_client_ca: Path | None = field(
        default=None, metadata={"help": "PEM CA bundle: require client certificates (mTLS)"}
    )
    triton: tuple[str, ...] = field(
        default=(), metadata={"repeatable": True, "help": "a remote Triton upstream, "
                              "NAME=HOST:PORT[,max_in_flight=N][,timeout_s=S][,export=all]"
                              "[,tls=true][,ca=PEM][,cert=PEM,key=PEM][,server_name=NAME]; "
                              "repeatable (a list in the file, space-separated in the env)"}
    )
    triton_probe_interval_s: float = field(
        default=1.0, metadata={"help": "seconds between health probes of each Triton upstream"}
    )
    triton_refresh_interval_s: float = field(
        default=10.0, metadata={"help": "seconds between re-reading the model lists of "
                                "export=all Triton upstreams"}
    )
    monitoring: bool = field(
        default=True, metadata={"help": "drift monitoring: sample inferences per model "
                                "version into windowed statistics scored against the "
                                "version's profile.json (docs/monitoring.md)"}
    )
    monitoring_sample_every: int = field(
        default=10, metadata={"help": "monitor 1 inference in this many, per model version "
                              "(1: every one)"}
    )
    monitoring_max_rows_per_s: int = field(
        default=1000, metadata={"help": "rows per second and version the monitor takes at "
                                "most; samples over it are dropped and counted (0: no cap)"}
    )
    monitoring_exclude: tuple[str, ...] = field(
        default=(), metadata={"repeatable": True, "help": "models never monitored; "
                              "repeatable (a list in the file, space-separated in the env)"}
    )
    monitoring_top_features: int = field(
        default=20, metadata={"help": "features per version exported as modelgate_drift "
                              "series, the highest PSI first (the cap on label cardinality)"}
    )
    # Internal, set by the supervisor for its workers (no flag, variable or file key): the
    # shared-memory quota table of gateway/quota/table.py.
    quota_table: Path | None = field(default=None, metadata={"internal": True})


_PORT = range(0, 65536)
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _upstreams_problem(entries: tuple[str, ...]) -> str | None:
    try:
        names = [parse_upstream(entry).name for entry in entries]
    except ValueError as exc:
        return str(exc)
    duplicates = sorted({n for n in names if names.count(n) > 1})
    return f"upstream name(s) {', '.join(duplicates)} declared twice" if duplicates else None


# Checks beyond the type: each returns a problem description, or None when fine.
_CHECKS: Final[Mapping[str, Callable[[Any], str | None]]] = {
    "store": lambda p: None if Path(p).is_dir() else f"{p} is not a directory",
    "host": lambda h: None if h else "must not be empty",
    "grpc_port": lambda p: None if p in _PORT else "must be a port number 0..65535",
    "metrics_port": lambda p: None if p in _PORT else "must be a port number 0..65535",
    "grace_period_s": lambda s: None if 0 <= s <= 3600 else "must lie in 0..3600",
    "max_message_bytes": lambda n: None if 1024 <= n <= 2**31 - 1 else
    "must lie in 1024..2147483647",
    "stream_max_inflight": lambda n: None if 1 <= n <= 65536 else "must lie in 1..65536",
    "max_inflight_requests": lambda n: None if 0 <= n <= 1_000_000 else
    "must lie in 0..1000000 (0: unlimited)",
    "max_concurrent_streams": lambda n: None if 0 <= n <= 1_000_000 else
    "must lie in 0..1000000 (0: unlimited)",
    "max_connections": lambda n: None if 0 <= n <= 1_000_000 else
    "must lie in 0..1000000 (0: unlimited)",
    "http_body_budget_bytes": lambda n: None if n == 0 or 1024 <= n <= 2**40 else
    "must be 0 (unlimited) or lie in 1024..1099511627776",
    "max_open_streams": lambda n: None if 0 <= n <= 1_000_000 else
    "must lie in 0..1000000 (0: unlimited)",
    "stream_idle_s": lambda s: None if s == 0 or 0.1 <= s <= 86400 else
    "must be 0 (never) or lie in 0.1..86400",
    "device": lambda d: None if d in ("auto", "cpu", "cuda") else "must be auto, cpu or cuda",
    "intra_op_threads": lambda n: None if 0 <= n <= 256 else "must lie in 0..256",
    "inter_op_threads": lambda n: None if 0 <= n <= 256 else "must lie in 0..256",
    "inline_compute_us": lambda n: None if 0 <= n <= 100_000 else "must lie in 0..100000",
    "staged_batches": lambda n: None if 1 <= n <= 8 else "must lie in 1..8",
    "event_loop": lambda v: None if v in ("auto", "uvloop", "asyncio") else
    "must be auto, uvloop or asyncio",
    "log_level": lambda v: None if v in _LEVELS else f"must be one of {', '.join(_LEVELS)}",
    "workers": lambda w: None if w == "auto" or (w.isdigit() and 1 <= int(w) <= 256) else
    "must be auto or a number 1..256",
    "poll_interval": lambda s: None if s == 0 or 0.05 <= s <= 3600 else
    "must be 0 (off) or lie in 0.05..3600",
    "http_port": lambda p: None if p is None or p in _PORT else
    "must be a port number 0..65535 (unset: no REST port)",
    "http_read_timeout_s": lambda s: None if 0.1 <= s <= 3600 else "must lie in 0.1..3600",
    "http_keepalive_s": lambda s: None if 0.1 <= s <= 86400 else "must lie in 0.1..86400",
    "trace_sampling_ratio": lambda r: None if r == -1 or 0 <= r <= 1 else
    "must lie in 0..1 (or be -1: from OTEL_TRACES_SAMPLER)",
    "tenants": lambda p: None if p is None or Path(p).is_file() else f"{p} is not a file",
    "redis_url": lambda u: None if not u or u.startswith(("redis://", "rediss://", "unix://"))
    else "must start with redis://, rediss:// or unix://",
    "redis_failure_mode": lambda m: None if m in ("fail-open", "fail-closed") else
    "must be fail-open or fail-closed",
    "tls_cert": lambda p: None if p is None or Path(p).is_file() else f"{p} is not a file",
    "tls_key": lambda p: None if p is None or Path(p).is_file() else f"{p} is not a file",
    "tls_client_ca": lambda p: None if p is None or Path(p).is_file() else f"{p} is not a file",
    "triton": _upstreams_problem,
    "triton_probe_interval_s": lambda s: None if 0.05 <= s <= 3600 else
    "must lie in 0.05..3600",
    "triton_refresh_interval_s": lambda s: None if 0.1 <= s <= 86400 else
    "must lie in 0.1..86400",
    "monitoring_sample_every": lambda n: None if 1 <= n <= 1_000_000 else
    "must lie in 1..1000000",
    "monitoring_max_rows_per_s": lambda n: None if 0 <= n <= 10_000_000 else
    "must lie in 0..10000000 (0: no cap)",
    "monitoring_top_features": lambda n: None if 0 <= n <= 10_000 else "must lie in 0..10000",
}


def upstream_configs(settings: Settings) -> list[UpstreamConfig]:
    """The Triton upstreams the settings declare (already checked by load_settings)."""
    return [parse_upstream(entry) for entry in settings.triton]


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The settings users can set, for the CLI to build flags from (not the internal ones)."""
    return tuple(f for f in dataclasses.fields(Settings) if not f.metadata.get("internal"))


def _integer(raw: Any) -> int:
    if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
        raise ValueError
    return int(raw)


def _real(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError
    return float(raw)


def _switch(raw: Any) -> bool:
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _words(raw: Any) -> tuple[str, ...]:
    # Repeatable: a TOML list, repeated flags, or one env value split on whitespace.
    items = raw.split() if isinstance(raw, str) else list(raw)
    if not all(isinstance(item, str) for item in items):
        raise ValueError
    return tuple(items)


def _text(raw: Any) -> str:
    if not isinstance(raw, str):
        raise ValueError
    return raw


# How a raw value (TOML, environment text or flag text) becomes each type a setting has.
_PARSERS: Final[dict[Any, Callable[[Any], Any]]] = {
    int: _integer, float: _real, bool: _switch, str: _text,
    Path: lambda raw: Path(str(raw)).expanduser(), tuple[str, ...]: _words,
}


@dataclass(frozen=True, slots=True)
class SettingType:
    """A setting's declared type, resolved: the parser's key and whether it may be unset."""

    kind: Any
    optional: bool

    @property
    def name(self) -> str:
        return self.kind.__name__ if isinstance(self.kind, type) else str(self.kind)


def setting_types() -> dict[str, SettingType]:
    """Each user setting's resolved type (annotations are strings under ``from __future__
    import annotations``; get_type_hints evaluates them)."""
    hints = typing.get_type_hints(Settings)
    resolved: dict[str, SettingType] = {}
    for f in fields():
        kind = hints[f.name]
        members = typing.get_args(kind) if isinstance(kind, types.UnionType) else ()
        optional = type(None) in members
        if optional:
            (kind,) = [m for m in members if m is not type(None)]
        if kind not in _PARSERS:
            raise TypeError(f"setting '{f.name}' has type {kind!r}, which no parser reads")
        resolved[f.name] = SettingType(kind, optional)
    return resolved


def _coerce(name: str, kind: SettingType, raw: Any, source: str) -> Any:
    # Optional settings: an empty value (env var, flag) means "not set".
    if kind.optional and (raw is None or raw == ""):
        return None
    try:
        return _PARSERS[kind.kind](raw)
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting '{name}' (from {source}): expected {kind.name}, got {raw!r}"
        ) from None


def load_settings(
    config_file: Path | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """Merge the four layers and check the result; raises SettingsError with one line per
    problem found, each naming the setting and where its value came from."""
    values: dict[str, tuple[Any, str]] = {}
    problems: list[str] = []
    known = {f.name: f for f in fields()}
    kinds = setting_types()
    if config_file is not None:
        try:
            data = tomllib.loads(config_file.read_text(encoding="utf-8"))
        except OSError as exc:
            raise SettingsError(f"setting 'config': cannot read {config_file}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"setting 'config': {config_file} is not TOML: {exc}") from exc
        for key, raw in data.items():
            name = key.replace("-", "_")
            if name not in known:
                problems.append(f"setting '{key}' (from {config_file}): unknown setting"
                                f"{did_you_mean(name, known)}")
                continue
            values[name] = (raw, str(config_file))
    for name in known:
        env_name = ENV_PREFIX + name.upper()
        if env_name in environ:
            values[name] = (environ[env_name], env_name)
    for name, raw in flags.items():
        if raw is not None:
            values[name] = (raw, "--" + name.replace("_", "-"))
    resolved: dict[str, Any] = {}
    for name, (raw, source) in values.items():
        try:
            value = _coerce(name, kinds[name], raw, source)
        except SettingsError as exc:
            problems.append(str(exc))  # checked further with its default
            continue
        if name == "log_level":
            value = str(value).upper()
        resolved[name] = value
    settings = Settings(**resolved)
    for name, check in _CHECKS.items():
        problem = check(getattr(settings, name))
        if problem is not None:
            source = values.get(name, (None, "default"))[1]
            problems.append(f"setting '{name}' (from {source}): {problem}")
    problems.extend(_port_collisions(settings))
    try:
        _check_security(settings, values)
    except SettingsError as exc:
        problems.append(str(exc))
    if problems:
        raise SettingsError("\n".join(problems), partial=settings)
    if settings.grpc_port == 0 and worker_count(settings) > 1:
        raise SettingsError("setting 'workers': several workers need a fixed grpc_port, not 0")
    return settings


def did_you_mean(name: str, known: Collection[str]) -> str:
    """``; did you mean 'x'?`` naming the closest known name, or nothing when none is close."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"; did you mean '{close[0]}'?" if close else ""


def _port_collisions(settings: Settings) -> list[str]:
    """Two listeners on one fixed port: serving would fail to bind the second."""
    ports = {"grpc_port": settings.grpc_port, "http_port": settings.http_port,
             "metrics_port": settings.metrics_port}
    taken: dict[int, str] = {}
    problems = []
    for name, port in ports.items():
        if not port:  # unset, or 0: any free port
            continue
        if port in taken:
            problems.append(f"setting '{name}': port {port} is also {taken[port]}; "
                            "each listener needs its own port")
        else:
            taken[port] = name
    return problems


def worker_count(settings: Settings) -> int:
    """The number of serving processes ``workers`` asks for."""
    return (os.cpu_count() or 1) if settings.workers == "auto" else int(settings.workers)


def _check_security(settings: Settings, values: Mapping[str, tuple[Any, str]]) -> None:
    """Cross-setting rules: TLS files come in pairs."""
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise SettingsError("setting 'tls_cert'/'tls_key': give both or neither")
    if settings.tls_client_ca is not None and settings.tls_cert is None:
        raise SettingsError("setting 'tls_client_ca': needs tls_cert and tls_key (mTLS is TLS)")


def check_exposure(settings: Settings) -> None:
    """A gateway that serves other machines must have tenants unless the operator says
    anonymous callers are fine; checked when serving starts (SettingsError: exit 2)."""
    if settings.tenants is None and not settings.allow_anonymous and not is_loopback(
        settings.host
    ):
        raise SettingsError(
            f"setting 'host': {settings.host} is reachable from other machines but no "
            "tenants file is set; give --tenants, or --allow-anonymous to serve it open"
        )


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine."""
    name = host.strip("[]")
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
