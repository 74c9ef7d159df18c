"""Dependency direction, checked on the import statements themselves: gateway -> runtimes
-> model_store with nothing pointing back; inside gateway/, the foundation modules import no
wing and each wing only the wings before it; generated protobuf only where the wire is."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "model_store": {"runtimes", "gateway", "grpc", "loadtests"},
    "runtimes": {"gateway", "loadtests"},
    "gateway": {"loadtests"},
}

# gateway/'s wings, lowest first (docs/architecture.md): a wing imports only wings before
# it. wire and http are peers (neither imports the other); so are the wings of one tuple.
WINGS: tuple[tuple[str, ...], ...] = (
    ("quota",), ("tenancy",), ("request",), ("observability",), ("batching",), ("models",),
    ("monitoring",), ("pipeline",), ("wire", "http"), ("process",),
)
FOUNDATION = frozenset({"errors", "sanitize", "settings", "status"})

# Who may import generated protobuf (modelgate_pb): the gRPC adapter, the Triton runtime
# (its wire and upstream pool), and model_store's config parsing (model_config only).
PROTOBUF_ANYWHERE = ("gateway/wire/", "runtimes/triton_", "runtimes/upstreams.py")
PROTOBUF_CONFIG_ONLY = ("model_store/",)
CONFIG_MODULE = "modelgate_pb.model_config_pb2"


def _modules(path: Path) -> set[str]:
    """Every module ``path`` imports, dotted and absolute (``from a import b`` gives a.b
    as well as a, since b may be a module)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def _imports(path: Path) -> set[str]:
    return {name.split(".")[0] for name in _modules(path)}


def _rank(wing: str) -> int | None:
    for rank, peers in enumerate(WINGS):
        if wing in peers:
            return rank
    return None


def wing_violations(path: Path, relative: str) -> list[str]:
    """The imports of gateway module ``relative`` (e.g. gateway/models/x.py) that break the
    wing order."""
    parts = relative.split("/")
    own = parts[1] if len(parts) > 2 else None  # None: a foundation module
    if own is None and parts[1].removesuffix(".py") not in FOUNDATION | {"__init__"}:
        return [f"{relative} is a top-level module that is neither foundation nor a wing"]
    own_rank = _rank(own) if own is not None else -1
    if own is not None and own_rank is None:
        return [f"{relative} is in a wing the order does not list ({own})"]
    bad: list[str] = []
    for module in sorted(_modules(path)):
        names = module.split(".")
        if names[0] != "gateway" or len(names) < 2 or names[1] in FOUNDATION:
            continue
        target = names[1]
        if target == own:
            continue
        rank = _rank(target)
        if rank is None or own_rank is None or rank >= own_rank:
            bad.append(f"{relative} imports {module} (wing {target})")
    return bad


def protobuf_violations(path: Path, relative: str) -> list[str]:
    found = [m for m in _modules(path) if m == "modelgate_pb" or m.startswith("modelgate_pb.")]
    if not found or relative.startswith(PROTOBUF_ANYWHERE):
        return []
    if relative.startswith(PROTOBUF_CONFIG_ONLY):
        found = [m for m in found if m not in ("modelgate_pb", CONFIG_MODULE)]
    return [f"{relative} imports {m}" for m in sorted(set(found))]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_import_points_the_wrong_way(package: str) -> None:
    offenders = []
    for path in sorted((ROOT / package).rglob("*.py")):
        bad = _imports(path) & FORBIDDEN[package]
        if bad:
            offenders.append(f"{path.relative_to(ROOT)} imports {sorted(bad)}")
    assert not offenders, "\n".join(offenders)


def test_each_wing_imports_only_the_wings_before_it() -> None:
    offenders: list[str] = []
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        offenders += wing_violations(path, path.relative_to(ROOT).as_posix())
    assert not offenders, "\n".join(offenders)


def test_generated_protobuf_stays_at_the_wire() -> None:
    offenders: list[str] = []
    for package in ("gateway", "runtimes", "model_store"):
        for path in sorted((ROOT / package).rglob("*.py")):
            offenders += protobuf_violations(path, path.relative_to(ROOT).as_posix())
    assert not offenders, "\n".join(offenders)


def test_the_check_catches_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from gateway.manager import ModelManager\nimport runtimes.base\n")
    assert {"gateway", "runtimes"} <= _imports(sample)


def test_the_wing_check_catches_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    # A lower wing reaching up (models -> pipeline), a peer (wire -> http), the foundation
    # importing a wing: each is caught; a foundation import from a wing is not.
    sample.write_text("from gateway.pipeline.pipeline import InferencePipeline\n"
                      "from gateway import errors\n")
    found = wing_violations(sample, "gateway/models/sample.py")
    assert found and all("(wing pipeline)" in line for line in found)
    sample.write_text("import gateway.http.server\n")
    assert wing_violations(sample, "gateway/wire/sample.py")
    sample.write_text("from gateway.quota.store import Limits\n")
    assert wing_violations(sample, "gateway/status.py")
    assert not wing_violations(sample, "gateway/tenancy/sample.py")


def test_the_protobuf_check_catches_a_wrong_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from modelgate_pb import grpc_service_pb2 as pb\n")
    assert protobuf_violations(sample, "gateway/pipeline/sample.py")
    assert protobuf_violations(sample, "model_store/sample.py")
    assert not protobuf_violations(sample, "gateway/wire/sample.py")
    sample.write_text("from modelgate_pb import model_config_pb2 as mc\n")
    assert not protobuf_violations(sample, "model_store/sample.py")
    assert protobuf_violations(sample, "gateway/http/sample.py")


# The values every wing shares live in request/ (docs/architecture.md, wing 3), once.
SHARED_REQUEST_VALUES = {
    "RequestContext": "gateway/request/context.py",
    "DecodedRequest": "gateway/request/decoded.py",
    "RequestLayout": "gateway/request/decoded.py",
    "OutputOptions": "gateway/request/decoded.py",
    "MemoryRef": "gateway/request/decoded.py",
    "Inference": "gateway/request/inference.py",
    "request_metadata": "gateway/request/headers.py",
    "InflightLimit": "gateway/request/inflight.py",
}


def _definitions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return {node.name for node in tree.body
            if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))}


def test_the_shared_request_values_are_defined_once_in_request() -> None:
    homes: dict[str, list[str]] = {name: [] for name in SHARED_REQUEST_VALUES}
    for path in sorted((ROOT / "gateway").rglob("*.py")):
        for name in _definitions(path) & homes.keys():
            homes[name].append(path.relative_to(ROOT).as_posix())
    assert homes == {name: [home] for name, home in SHARED_REQUEST_VALUES.items()}
