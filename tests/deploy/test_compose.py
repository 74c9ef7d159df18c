"""deploy/compose: `podman-compose config` parses the stack (with and without the TLS
override), and each gateway service's command line and environment, with its files
mounted as the stack mounts them, pass `modelgate serve --check-config` in the image."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy import podman as pm
from tests.deploy.test_observability import dashboard_queries
from tests.gateway.test_tenants import admin
from tests.support.certs import CertificateAuthority
from tests.support.gateway import REPO_ROOT

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

COMPOSE = REPO_ROOT / "deploy" / "compose"
SERVICES = {"gateway-1", "gateway-2", "envoy", "redis", "triton", "otel-collector", "jaeger",
            "prometheus", "grafana"}
UID = 10001


def compose_config(*files: str) -> dict[str, Any]:
    executable = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    executable = executable or shutil.which("podman-compose")
    if executable is None:
        pytest.fail("podman-compose is not installed (a test extra of pyproject.toml)")
    args = [arg for name in files for arg in ("-f", str(COMPOSE / name))]
    result = subprocess.run([executable, *args, "config"], capture_output=True, text=True,
                            timeout=60, cwd=COMPOSE, env=pm.environment(), check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """What a user puts next to compose.yaml: a tenants file and, for TLS, certificates."""
    root = tmp_path_factory.mktemp("compose-files")
    tenants = root / "tenants.toml"
    assert admin(tenants, "create", "demo")[0] == 0
    certs = root / "certs"
    certs.mkdir()
    ca = CertificateAuthority()
    server = ca.issue("gateway-1", server=True)
    (certs / "server.crt").write_bytes(server.cert)
    (certs / "server.key").write_bytes(server.key)
    (certs / "ca.crt").write_bytes(ca.pem)
    for path in (root, certs, tenants, *certs.iterdir()):
        os.chown(path, UID, UID)
    return {"./tenants.toml": tenants, "./certs": certs}


def check_config_in_image(service: dict[str, Any], files: dict[str, Path]) -> str:
    args = ["run", "--rm", "--network", "host"]
    for name, value in service.get("environment", {}).items():
        args += ["--env", f"{name}={value}"]
    for volume in service.get("volumes", []):
        source, target, *mode = str(volume).split(":")
        # podman-compose writes sources as given or made absolute against the compose folder.
        relative = "./" + os.path.relpath(source, COMPOSE) if os.path.isabs(source) else source
        host = files.get(relative, COMPOSE / relative)
        assert host.exists(), f"{volume}: {host} does not exist"
        args += ["--volume", ":".join([str(host), target, *mode])]
    result = pm.podman(*args, pm.IMAGE, *service["command"], "--check-config", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def image() -> str:
    pm.build_image()
    return pm.IMAGE


@pytest.mark.parametrize("overrides", [(), ("compose.tls.yaml",)], ids=["plain", "tls"])
def test_the_stack_parses_and_its_gateways_pass_check_config(
    image: str, files: dict[str, Path], overrides: tuple[str, ...]
) -> None:
    config = compose_config("compose.yaml", *overrides)
    assert set(config["services"]) == SERVICES
    for name in ("gateway-1", "gateway-2"):
        service = config["services"][name]
        if overrides:
            assert service["environment"]["MODELGATE_TLS_CERT"].endswith("server.crt")
            assert "MODELGATE_TENANTS" in service["environment"]  # merged, not replaced
        output = check_config_in_image(service, files)
        assert "configuration OK" in output


def test_envoy_and_prometheus_point_at_the_gateways_ports() -> None:
    envoy = yaml.safe_load((COMPOSE / "envoy.yaml").read_text())
    cluster = envoy["static_resources"]["clusters"][0]
    endpoints = {(e["endpoint"]["address"]["socket_address"]["address"],
                  e["endpoint"]["address"]["socket_address"]["port_value"])
                 for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]}
    assert endpoints == {("gateway-1", 8001), ("gateway-2", 8001)}  # the image's gRPC port
    assert "grpc_health_check" in cluster["health_checks"][0]
    http = envoy["static_resources"]["clusters"][1]
    assert {e["endpoint"]["address"]["socket_address"]["port_value"]
            for e in http["load_assignment"]["endpoints"][0]["lb_endpoints"]} == {8000}
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job["static_configs"][0]["targets"]
            for job in prometheus["scrape_configs"]}
    assert jobs["modelgate"] == ["gateway-1:8002", "gateway-2:8002"]  # the metrics port
    assert "triton" in jobs
    # The alert rules' and dashboard's job names are these.
    alerts = (REPO_ROOT / "deploy" / "observability" / "alerts.yaml").read_text()
    assert 'up{job="modelgate"}' in alerts
    queries = dashboard_queries()
    assert {'up{job="modelgate"}', 'up{job="triton"}'} <= set(queries)
