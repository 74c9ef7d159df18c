"""The container tests' podman: its settings file, the locally built Debian base, the
gateway image built from the repository's Dockerfile, and running commands against them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from tests.support.gateway import REPO_ROOT

HERE = Path(__file__).resolve().parent
BASE_IMAGE = "localhost/modelgate-test-base:bookworm"
IMAGE = "localhost/modelgate:test"
# The machine's CA bundle: behind a TLS-intercepting proxy pip needs it to reach PyPI.
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


class PodmanMissingError(RuntimeError):
    """podman is not installed although scripts/install_test_deps.sh installs it."""


def environment() -> dict[str, str]:
    return {**os.environ, "CONTAINERS_CONF": str(HERE / "containers.conf")}


def podman(*args: str, timeout: float = 120, check: bool = True,
           ) -> subprocess.CompletedProcess[str]:
    """Run ``podman args``; raises with its output when ``check`` and it fails."""
    executable = shutil.which("podman")
    if executable is None:
        raise PodmanMissingError("podman is not on PATH: run scripts/install_test_deps.sh")
    result = subprocess.run([executable, *args], capture_output=True, text=True,
                            timeout=timeout, env=environment(), check=False)
    if check and result.returncode != 0:
        raise RuntimeError(f"podman {' '.join(args[:3])} exited {result.returncode}:\n"
                           f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}")
    return result


def build_base() -> None:
    """The Debian bookworm base with Debian's python3 (kept once built)."""
    if podman("image", "exists", BASE_IMAGE, check=False).returncode == 0:
        return
    subprocess.run(["bash", str(HERE / "build_base.sh"), BASE_IMAGE], check=True,
                   timeout=1200, env=environment())


def build_image(extra: Sequence[str] = ()) -> str:
    """Build the gateway image from the repository on the local base; podman's layer cache
    makes a rebuild without dependency changes take seconds. Returns the build output."""
    build_base()
    secret = ["--secret", f"id=pip_ca,src={CA_BUNDLE}"] if CA_BUNDLE.is_file() else []
    result = podman(
        "build", "--network", "host", "--format", "docker", *secret,
        "--build-arg", f"BASE={BASE_IMAGE}", *extra, "-t", IMAGE, str(REPO_ROOT),
        timeout=1500,
    )
    return result.stdout


SERVICES_IMAGE = "localhost/modelgate-test-services:bookworm"


def build_services() -> None:
    """Debian's redis-server and nginx on the local base (services.Containerfile), the
    Compose core's stand-ins for the Redis and Envoy images; kept once built."""
    build_base()
    if podman("image", "exists", SERVICES_IMAGE, check=False).returncode == 0:
        return
    podman("build", "--network", "host", "--build-arg", f"BASE={BASE_IMAGE}",
           "-f", str(HERE / "services.Containerfile"), "-t", SERVICES_IMAGE, str(HERE),
           timeout=1200)
