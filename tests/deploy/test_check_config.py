"""``modelgate serve --check-config``: the real command checks settings, store, routing,
tenants and TLS files and exits 0 or 2 without binding a port."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.gateway.tenancy.test_tenants import admin
from tests.support.certs import CertificateAuthority
from tests.support.gateway import REPO_ROOT
from tests.support.models import add_constant, add_model_config, write_model

pytestmark = pytest.mark.timeout(120)


def check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.process.cli", "serve", "--check-config", *args],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **(env or {})},
    )


@pytest.fixture
def store(tmp_path: Path) -> Path:
    root = tmp_path / "store"
    write_model(root, "plus", 1, add_constant(1.0), add_model_config("plus"))
    return root


def test_a_good_configuration_exits_0_and_lists_the_models(store: Path, tmp_path: Path) -> None:
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "acme")[0] == 0
    result = check("--store", str(store), "--host", "0.0.0.0", "--tenants", str(tenants),
                   env={"MODELGATE_GRPC_PORT": "9001"})
    assert result.returncode == 0, result.stderr
    assert "configuration OK (1 models)" in result.stdout
    assert "model plus: versions 1" in result.stdout


def test_each_kind_of_problem_exits_2_naming_it(store: Path, tmp_path: Path) -> None:
    assert "metrics_port" in check("--store", str(store), "--metrics-port", "70000").stderr
    assert check("--store", str(store), "--metrics-port", "70000").returncode == 2
    assert "MODELGATE_WORKERS" in check("--store", str(store),
                                        env={"MODELGATE_WORKERS": "lots"}).stderr
    # Open on a public address without tenants.
    exposed = check("--store", str(store), "--host", "0.0.0.0")
    assert exposed.returncode == 2 and "--allow-anonymous" in exposed.stderr
    assert check("--store", str(store), "--host", "0.0.0.0",
                 "--allow-anonymous").returncode == 0
    # A tenants file that is not one.
    bad_tenants = tmp_path / "bad.toml"
    bad_tenants.write_text("[tenants.acme]\nmodels = 3\n")
    result = check("--store", str(store), "--tenants", str(bad_tenants))
    assert result.returncode == 2 and "tenants file" in result.stderr
    # A model whose file is missing, and a broken routing.toml.
    write_model(store, "broken", 1, add_constant(1.0), add_model_config("broken"))
    (store / "broken" / "1" / "model.onnx").unlink()
    (store / "plus" / "routing.toml").write_text("[labels]\nstable = 7\n[weights]\nnope = 1.0\n")
    result = check("--store", str(store))
    assert result.returncode == 2
    assert "model broken version 1: model file model.onnx is missing" in result.stderr
    assert "model plus: routing.toml" in result.stderr


def test_tls_files_are_read(store: Path, tmp_path: Path) -> None:
    ca = CertificateAuthority()
    server = ca.issue("localhost", server=True)
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(server.cert)
    key.write_bytes(server.key)
    assert check("--store", str(store), "--tls-cert", str(cert),
                 "--tls-key", str(key)).returncode == 0
    key.write_text("not a key\n")
    result = check("--store", str(store), "--tls-cert", str(cert), "--tls-key", str(key))
    assert result.returncode == 2 and "PEM" in result.stderr
    missing = check("--store", str(store), "--tls-cert", str(cert))
    assert missing.returncode == 2 and "give both or neither" in missing.stderr


def test_every_problem_is_one_line_and_an_unknown_key_gets_the_nearest_name(
    store: Path, tmp_path: Path
) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('grpc_prot = 9001\nhttp_port = 9100\nmetrics_port = 9100\n'
                      'grace_period_s = "soon"\n')
    result = check("--config", str(config), "--store", str(store),
                   env={"MODELGATE_WORKERS": "lots"})
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert all(line.startswith("modelgate: error: setting '") for line in lines), lines
    expected = [
        f"setting 'grpc_prot' (from {config}): unknown setting; did you mean 'grpc_port'?",
        f"setting 'grace_period_s' (from {config}): expected float",
        "setting 'workers' (from MODELGATE_WORKERS): must be auto or a number 1..256",
        "setting 'metrics_port': port 9100 is also http_port; each listener needs its own port",
    ]
    for text in expected:
        assert sum(text in line for line in lines) == 1, (text, lines)
    assert len(lines) == len(expected), lines


def test_bad_settings_and_the_files_they_point_at_are_reported_in_one_run(
    store: Path, tmp_path: Path
) -> None:
    """A bad setting does not hide a broken store or tenants file: both show in one run."""
    (store / "plus" / "1" / "model.onnx").unlink()
    tenants = tmp_path / "tenants.toml"
    tenants.write_text("[tenants.acme\n", encoding="utf-8")
    result = check("--store", str(store), "--tenants", str(tenants), "--grace-period-s",
                   "soon")
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert "setting 'grace_period_s' (from --grace-period-s): expected float" in lines[0]
    assert any("model plus version 1: model file model.onnx is missing" in line
               for line in lines), lines
    assert any(str(tenants) in line for line in lines[1:]), lines


def test_grpc_and_rest_on_one_port_collide(store: Path) -> None:
    result = check("--store", str(store), "--grpc-port", "9001", "--http-port", "9001")
    assert result.returncode == 2
    assert "setting 'http_port': port 9001 is also grpc_port" in result.stderr
    # 0 asks for any free port: never a collision.
    assert check("--store", str(store), "--grpc-port", "0", "--http-port", "0",
                 "--metrics-port", "0").returncode == 0


def test_an_empty_store_is_an_error_unless_allowed(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = check("--store", str(empty))
    assert result.returncode == 2
    assert f"setting 'store': {empty} holds no model" in result.stderr
    assert "--allow-empty-store" in result.stderr
    allowed = check("--store", str(empty), "--allow-empty-store")
    assert allowed.returncode == 0, allowed.stderr
    assert "configuration OK (0 models)" in allowed.stdout


def test_serve_refuses_an_empty_store_before_binding(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "gateway.process.cli", "serve", "--store", str(empty),
         "--grpc-port", "0", "--metrics-port", "0"],
        check=False, capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT)},
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"modelgate: error: setting 'store': {empty} holds no model")
