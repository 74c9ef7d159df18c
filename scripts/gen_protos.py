"""Regenerate the Python protobuf/gRPC modules from the .proto files in protos/.

Runs grpc_tools' bundled protoc over every ``protos/**/*.proto`` with ``-I protos``
and writes ``*_pb2.py`` and ``*_pb2.pyi`` for every proto, plus ``*_pb2_grpc.py``
for protos that declare a service, into ``<out>/modelgate_pb/``.

The .proto files sit at the root of protos/ so that protobuf registers them under the same
file names Triton's own compiled protos use (``grpc_service.proto``, ``model_config.proto``).
Identical files under identical names share one descriptor pool entry, which lets our
generated classes and ``tritonclient`` live in one process; different names would collide
on every ``inference.*`` symbol. protoc then writes top-level imports
(``import model_config_pb2``), which this script rewrites to package imports.

Usage::

    python scripts/gen_protos.py             # writes into the repository root
    python scripts/gen_protos.py --out DIR   # writes into DIR (used by the tests)

This is what ``make proto`` runs. Exits non-zero when protoc fails.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from google.protobuf import descriptor_pb2

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = REPO_ROOT / "protos"


def find_protos(proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Return every .proto file under ``proto_root``, sorted for a stable order."""
    return sorted(proto_root.rglob("*.proto"))


def bundled_include_dir() -> Path:
    """Return grpc_tools' directory of well-known protos (google/protobuf/*.proto)."""
    return Path(str(resources.files("grpc_tools") / "_proto"))


_TOP_LEVEL_IMPORT = re.compile(r"^import (\w+_pb2) as (\w+)$", re.MULTILINE)
PACKAGE = "modelgate_pb"


def _package_imports(out_dir: Path) -> None:
    """Rewrite protoc's top-level imports of sibling modules into package imports."""
    for path in sorted(out_dir.glob("*_pb2*.py*")):
        text = path.read_text(encoding="utf-8")
        fixed = _TOP_LEVEL_IMPORT.sub(rf"from {PACKAGE} import \1 as \2", text)
        if fixed != text:
            path.write_text(fixed, encoding="utf-8")


def _drop_serviceless_grpc_modules(descriptor_set: Path, out_dir: Path) -> None:
    """Delete the near-empty ``*_pb2_grpc.py`` protoc writes for protos without services."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    for file_proto in fds.file:
        if not file_proto.service:
            stem = file_proto.name.removesuffix(".proto")
            (out_dir / f"{stem}_pb2_grpc.py").unlink(missing_ok=True)


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> int:
    """Run protoc over all protos into ``out_dir``; return protoc's exit status."""
    # Imported here: heavy, and only needed when generating. grpc_tools ships no type hints.
    from grpc_tools import protoc  # type: ignore[import-untyped]

    protos = find_protos(proto_root)
    if not protos:
        print(f"gen_protos: no .proto files under {proto_root}", file=sys.stderr)
        return 1
    out_dir = out_dir / PACKAGE
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gen_protos-") as tmp:
        descriptor_set = Path(tmp) / "descriptors.binpb"
        args = [
            "grpc_tools.protoc",  # argv[0]; protoc ignores it
            f"-I{proto_root}",
            f"-I{bundled_include_dir()}",
            f"--python_out={out_dir}",
            f"--grpc_python_out={out_dir}",
            f"--pyi_out={out_dir}",
            f"--descriptor_set_out={descriptor_set}",
            *(str(p) for p in protos),
        ]
        status = int(protoc.main(args))
        if status != 0:
            print(f"gen_protos: protoc failed with exit status {status}", file=sys.stderr)
            return status
        _drop_serviceless_grpc_modules(descriptor_set, out_dir)
    _package_imports(out_dir)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        description="Regenerate the Python protobuf/gRPC modules from protos/."
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=REPO_ROOT,
        help="output root; files land in <out>/modelgate_pb/ (default: repository root)",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=PROTO_ROOT,
        help="root of the .proto tree, used as the -I path (default: protos/)",
    )
    ns = parser.parse_args(argv)
    out: Path = ns.out
    proto_root: Path = ns.proto_root
    return generate(out.resolve(), proto_root.resolve())


if __name__ == "__main__":
    sys.exit(main())
