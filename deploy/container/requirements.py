"""Prints the gateway's runtime requirements from pyproject.toml for the image build, with
ONNX Runtime's package chosen by the build (onnxruntime for CPU, onnxruntime-gpu for CUDA)."""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

# "onnxruntime-gpu==1.31.1; sys_platform == 'linux'" -> the version, whichever variant.
_ORT = re.compile(r"^onnxruntime(?:-gpu)?==(?P<version>[^;\s]+)")


def requirements(pyproject: Path, ort_package: str) -> list[str]:
    """The [project] dependencies with both ONNX Runtime lines replaced by one for
    ``ort_package`` at the version pyproject pins."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    lines: list[str] = []
    versions: set[str] = set()
    for dependency in project["dependencies"]:
        match = _ORT.match(dependency)
        if match is None:
            lines.append(dependency)
        else:
            versions.add(match["version"])
    if len(versions) != 1:
        raise SystemExit(f"expected one pinned ONNX Runtime version, found {sorted(versions)}")
    lines.append(f"{ort_package}=={versions.pop()}")
    return lines


if __name__ == "__main__":
    pyproject, ort_package = Path(sys.argv[1]), sys.argv[2]
    if ort_package not in ("onnxruntime", "onnxruntime-gpu"):
        raise SystemExit(f"ORT_PACKAGE must be onnxruntime or onnxruntime-gpu, not {ort_package}")
    print("\n".join(requirements(pyproject, ort_package)))
