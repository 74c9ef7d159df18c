"""Settings, built once at start-up from defaults, a TOML file, MODELGATE_* environment
variables and command-line flags (later wins), checked, then passed down."""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final

ENV_PREFIX: Final = "MODELGATE_"


class SettingsError(Exception):
    """A setting with a bad value; the message names the setting, where it came from and
    what is wrong."""


def demo_store() -> Path:
    """The demo model store shipped inside the package."""
    return Path(str(resources.files("gateway") / "demo_store"))


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting of the gateway. Field metadata gives each one's parser and help."""

    store: Path = field(default_factory=demo_store, metadata={"help": "model store folder"})
    host: str = field(default="127.0.0.1", metadata={"help": "address to bind"})
    grpc_port: int = field(default=8001, metadata={"help": "gRPC port (0 = any free port)"})
    metrics_port: int = field(default=8002, metadata={"help": "HTTP port for /metrics"})
    grace_period_s: float = field(
        default=10.0, metadata={"help": "seconds in-flight requests get to finish on SIGTERM"}
    )
    max_message_bytes: int = field(
        default=64 * 1024 * 1024, metadata={"help": "largest gRPC message received or sent"}
    )
    device: str = field(default="auto", metadata={"help": "onnxruntime device: auto|cpu|cuda"})
    intra_op_threads: int = field(
        default=1, metadata={"help": "onnxruntime intra-op threads per session"}
    )
    inter_op_threads: int = field(
        default=1, metadata={"help": "onnxruntime inter-op threads per session"}
    )
    log_level: str = field(default="INFO", metadata={"help": "DEBUG|INFO|WARNING|ERROR"})


_PORT = range(0, 65536)
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

# Checks beyond the type: each returns a problem description, or None when fine.
_CHECKS: Final[Mapping[str, Callable[[Any], str | None]]] = {
    "store": lambda p: None if Path(p).is_dir() else f"{p} is not a directory",
    "host": lambda h: None if h else "must not be empty",
    "grpc_port": lambda p: None if p in _PORT else "must be a port number 0..65535",
    "metrics_port": lambda p: None if p in _PORT else "must be a port number 0..65535",
    "grace_period_s": lambda s: None if 0 <= s <= 3600 else "must lie in 0..3600",
    "max_message_bytes": lambda n: None if 1024 <= n <= 2**31 - 1 else
    "must lie in 1024..2147483647",
    "device": lambda d: None if d in ("auto", "cpu", "cuda") else "must be auto, cpu or cuda",
    "intra_op_threads": lambda n: None if 0 <= n <= 256 else "must lie in 0..256",
    "inter_op_threads": lambda n: None if 0 <= n <= 256 else "must lie in 0..256",
    "log_level": lambda v: None if v in _LEVELS else f"must be one of {', '.join(_LEVELS)}",
}


def fields() -> tuple[dataclasses.Field[Any], ...]:
    """The settings' fields, for the CLI to build flags from."""
    return dataclasses.fields(Settings)


def _coerce(name: str, kind: Any, raw: Any, source: str) -> Any:
    kind_name = kind if isinstance(kind, str) else kind.__name__
    try:
        if kind_name == "int":
            if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
                raise ValueError
            return int(raw)
        if kind_name == "float":
            if isinstance(raw, bool):
                raise ValueError
            return float(raw)
        if kind_name == "bool":
            if isinstance(raw, bool):
                return raw
            text = str(raw).strip().lower()
            if text in ("1", "true", "yes", "on"):
                return True
            if text in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind_name == "Path":
            return Path(str(raw)).expanduser()
        if not isinstance(raw, str):
            raise ValueError
        return raw
    except (TypeError, ValueError):
        raise SettingsError(
            f"setting '{name}' (from {source}): expected {kind_name}, got {raw!r}"
        ) from None


def load_settings(
    config_file: Path | None, environ: Mapping[str, str], flags: Mapping[str, Any]
) -> Settings:
    """Merge the four layers and check the result; raises SettingsError naming the setting."""
    values: dict[str, tuple[Any, str]] = {}
    known = {f.name: f for f in fields()}
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
                raise SettingsError(f"setting '{key}' (from {config_file}): unknown setting")
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
        value = _coerce(name, known[name].type, raw, source)
        if name == "log_level":
            value = str(value).upper()
        resolved[name] = value
    settings = Settings(**resolved)
    for name, check in _CHECKS.items():
        problem = check(getattr(settings, name))
        if problem is not None:
            source = values.get(name, (None, "default"))[1]
            raise SettingsError(f"setting '{name}' (from {source}): {problem}")
    return settings
