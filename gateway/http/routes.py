"""The REST paths of the V2 protocol (with Triton's statistics, repository, trace, logging
and shared-memory extensions) and the gRPC method each one mirrors: the method name labels
metrics, the access log and spans, and decides auth and the in-flight cap as for gRPC."""

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
                         "drift": ("GET", "ModelDrift"),
                         # Triton's generate extension (not served: 501 naming it).
                         "generate": ("POST", "ModelGenerate"),
                         "generate_stream": ("POST", "ModelGenerateStream")}
_CONTROL: Final = {"load": "RepositoryModelLoad", "unload": "RepositoryModelUnload"}
# Read with GET, changed with POST (Triton's trace and logging extensions).
READ_OR_CHANGE: Final = "GET POST"
# Triton's shared-memory extensions by path segment: the gRPC methods' name prefix.
_SHARED_MEMORY: Final = {"systemsharedmemory": "SystemSharedMemory",
                         "cudasharedmemory": "CudaSharedMemory"}

# Every route, as (method, path template): what the auth-surface test walks.
ROUTES: Final = (
    ("GET", "/v2/health/live"), ("GET", "/v2/health/ready"), ("GET", "/v2"),
    ("GET", "/v2/models/{m}"), ("GET", "/v2/models/{m}/versions/{v}"),
    ("GET", "/v2/models/{m}/ready"), ("GET", "/v2/models/{m}/versions/{v}/ready"),
    ("GET", "/v2/models/{m}/config"), ("GET", "/v2/models/{m}/versions/{v}/config"),
    ("GET", "/v2/models/stats"), ("GET", "/v2/models/{m}/stats"),
    ("GET", "/v2/models/{m}/versions/{v}/stats"),
    ("POST", "/v2/models/{m}/infer"), ("POST", "/v2/models/{m}/versions/{v}/infer"),
    ("POST", "/v2/models/{m}/generate"), ("POST", "/v2/models/{m}/generate_stream"),
    ("GET", "/v2/models/{m}/drift"), ("GET", "/v2/models/{m}/versions/{v}/drift"),
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/{m}/load"), ("POST", "/v2/repository/models/{m}/unload"),
    ("GET", "/v2/trace/setting"), ("POST", "/v2/trace/setting"),
    ("GET", "/v2/models/{m}/trace/setting"), ("POST", "/v2/models/{m}/trace/setting"),
    ("GET", "/v2/logging"), ("POST", "/v2/logging"),
    *((method, f"/v2/{segment}{tail}")
      for segment in ("systemsharedmemory", "cudasharedmemory")
      for method, tail in (("GET", "/status"), ("GET", "/region/{m}/status"),
                           ("POST", "/region/{m}/register"), ("POST", "/unregister"),
                           ("POST", "/region/{m}/unregister"))),
)


@dataclass(frozen=True, slots=True)
class Route:
    """A matched path: the gRPC method it mirrors, the HTTP method it takes (or methods,
    space-separated), the model (or shared-memory region) and version it names ('' where
    none)."""

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
    if rest == ["trace", "setting"]:
        return Route("TraceSetting", READ_OR_CHANGE)
    if rest == ["logging"]:
        return Route("LogSettings", READ_OR_CHANGE)
    if rest[0] in _SHARED_MEMORY:
        return _shared_memory_route(_SHARED_MEMORY[rest[0]], rest[1:])
    return None


def _shared_memory_route(prefix: str, rest: list[str]) -> Route | None:
    """GET [/region/{r}]/status, POST /region/{r}/register, POST [/region/{r}]/unregister."""
    region = ""
    if len(rest) == 3 and rest[0] == "region" and rest[1]:
        region, rest = rest[1], rest[2:]
    if rest == ["status"]:
        return Route(f"{prefix}Status", "GET", region)
    if rest == ["register"] and region:
        return Route(f"{prefix}Register", "POST", region)
    if rest == ["unregister"]:
        return Route(f"{prefix}Unregister", "POST", region)
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
    if tail == ["trace", "setting"] and not version:
        return Route("TraceSetting", READ_OR_CHANGE, model)
    if len(tail) == 1 and tail[0] in _MODEL_ACTIONS:
        method, name = _MODEL_ACTIONS[tail[0]]
        return Route(name, method, model, version)
    return None
