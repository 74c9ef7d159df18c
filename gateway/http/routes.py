"""The REST paths of the V2 protocol (with Triton's statistics and repository extensions)
and the gRPC method each one mirrors: the method name labels metrics, the access log and
spans, and decides auth and the in-flight cap exactly as for gRPC."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

# Answered without a key, like their gRPC twins (gateway/tenancy/auth.py).
ANONYMOUS: Final = frozenset({"ServerLive", "ServerReady"})
CAPPED: Final = frozenset({"ModelInfer"})
# A model's sub-resources: GET .../ready|config|stats, POST .../infer.
# ModelDrift has no gRPC twin: the drift report (docs/monitoring.md), as on the metrics port.
_MODEL_ACTIONS: Final = {"ready": ("GET", "ModelReady"), "config": ("GET", "ModelConfig"),
                         "stats": ("GET", "ModelStatistics"), "infer": ("POST", "ModelInfer"),
                         "drift": ("GET", "ModelDrift")}
_CONTROL: Final = {"load": "RepositoryModelLoad", "unload": "RepositoryModelUnload"}

# Every route, as (method, path template): what the auth-surface test walks.
ROUTES: Final = (
    ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"),
    ("GET", "/v2/models/{m}"), ("GET", "/v2/models/{m}/versions/{v}"),
    ("GET", "/v2/models/{m}/ready"), ("GET", "/v2/models/{m}/versions/{v}/ready"),
    ("GET", "/v2/models/{m}/config"), ("GET", "/v2/models/{m}/versions/{v}/config"),
    ("GET", "/v2/models/stats"), ("GET", "/v2/models/{m}/stats"),
    ("GET", "/v2/models/{m}/versions/{v}/stats"),
    ("POST", "/v2/models/{m}/infer"), ("POST", "/v2/models/{m}/versions/{v}/infer"),
    ("GET", "/v2/models/{m}/drift"), ("GET", "/v2/models/{m}/versions/{v}/drift"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{m}/load"), ("POST", "/v2/repository/models/{m}/unload"),
)


@dataclass(frozen=True, slots=True)
class Route:
    """A matched path: the gRPC method it mirrors, the HTTP method it takes, the model and
    version it names ('' where none)."""

    name: str
    method: str
    model: str = ""
    version: str = ""


def match(path: str) -> Route | None:
    """The route of ``path`` (percent-decoded per segment), or None when there is none."""
    parts = path.rstrip("/").split("/")[1:] if path != "/" else []
    if not parts or parts[0] != "v2":
        return None
    rest = [unquote(p) for p in parts[1:]]
    if not rest:
        return Route("ServerMetadata", "GET")
    if rest == ["health", "live"]:
        return Route("ServerLive", "GET")
    if rest == ["health", "ready"]:
        return Route("ServerReady", "GET")
    if rest[0] == "models":
        return _model_route(rest[1:])
    if rest == ["repository", "index"]:
        return Route("RepositoryIndex", "POST")
    if len(rest) == 4 and rest[:2] == ["repository", "models"] and rest[3] in _CONTROL:
        return Route(_CONTROL[rest[3]], "POST", rest[2])
    return None


def _model_route(rest: list[str]) -> Route | None:
    if rest == ["stats"]:
        return Route("ModelStatistics", "GET")
    if not rest or not rest[0]:
        return None
    model, tail = rest[0], rest[1:]
    version = ""
    if len(tail) >= 2 and tail[0] == "versions":
        version, tail = tail[1], tail[2:]
        if not version:
            return None
    if not tail:
        return Route("ModelMetadata", "GET", model, version)
    if len(tail) == 1 and tail[0] in _MODEL_ACTIONS:
        method, name = _MODEL_ACTIONS[tail[0]]
        return Route(name, method, model, version)
    return None
