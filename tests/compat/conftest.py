"""Fixtures of the compatibility suite: the same tiny ONNX models served by the real gateway
(both transports; model control on and off) and by a real tritonserver (gRPC and HTTP, its
Python backend running the same ONNX files), so every tritonclient call can be made to both
and the answers compared."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import models
from tests.support.gateway import RunningGateway, free_port, running_gateway
from tests.support.triton_server import TritonServer, triton_install, write_triton_repository

# The models both servers serve, under the same names and configs: ``add`` (y = x + 1,
# doubled = 2x, FP32 [N, 4]) and ``all_types`` (an identity per V2 datatype, [N, 3]).
SHARED_MODELS = ("add", "all_types")


@dataclass(frozen=True)
class Server:
    """Where a server answers: its gRPC target and its HTTP host:port."""

    grpc: str
    http: str


@pytest.fixture(scope="package")
def compat_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("compat-store")
    models.write_model(root, "add", 1, models.add_constant(1.0), models.add_model_config("add"))
    models.write_model(root, "all_types", 1, models.identity_all_types(),
                       models.all_types_config())
    return root


def _server(gateway: RunningGateway) -> Server:
    return Server(gateway.target, f"127.0.0.1:{gateway.gateway.rest_port}")


@pytest.fixture(scope="package")
def modelgate(compat_store: Path) -> Iterator[Server]:
    """The gateway as shipped (model control off), open mode (no tenants file)."""
    with running_gateway(compat_store, http_port=0) as gateway:
        yield _server(gateway)


@pytest.fixture(scope="package")
def modelgate_control(compat_store: Path) -> Iterator[Server]:
    """The gateway with model control on (open mode: the caller is an admin)."""
    with running_gateway(compat_store, http_port=0, enable_model_control=True) as gateway:
        yield _server(gateway)


@pytest.fixture(scope="package")
def triton() -> Iterator[Server]:
    """A real tritonserver serving SHARED_MODELS over gRPC and HTTP (model control off, its
    default), from the .triton-venv that scripts/install_test_deps.sh installs."""
    install = triton_install()
    with tempfile.TemporaryDirectory(prefix="modelgate-compat-triton-") as tmp:
        workdir = Path(tmp)
        repo = write_triton_repository(workdir / "repo", SHARED_MODELS)
        http_port = free_port()
        server = TritonServer(install, repo, workdir, extra_args=(
            "--allow-http=true", "--http-address=127.0.0.1", f"--http-port={http_port}"))
        try:
            server.start(timeout=180)
            yield Server(server.target, f"127.0.0.1:{http_port}")
        finally:
            server.stop()
