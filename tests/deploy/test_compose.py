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


def test_a_tenants_file_the_gateway_cannot_read_is_named_with_the_fix(
    image: str, tmp_path: Path
) -> None:
    """`modelgate tenants` writes the file 0600 for the user who ran it; the image's user
    (10001) cannot read it until the docs' chown step."""
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "demo")[0] == 0
    assert tenants.stat().st_mode & 0o777 == 0o600 and tenants.stat().st_uid != UID
    os.chmod(tmp_path, 0o755)
    service = compose_config("compose.yaml")["services"]["gateway-1"]
    args = ["run", "--rm", "--network", "host",
            "--volume", f"{tenants}:/etc/modelgate/tenants.toml:ro",
            *[a for k, v in service["environment"].items() for a in ("--env", f"{k}={v}")],
            image, *service["command"], "--check-config"]
    refused = pm.podman(*args, check=False)
    assert refused.returncode == 2
    assert ("modelgate: error: tenants file /etc/modelgate/tenants.toml: permission denied "
            f"(owned by uid {os.getuid()}") in refused.stderr
    assert f"chown {UID} tenants.toml" in refused.stderr
    chown = next(line for line in compose_steps() if line.startswith("sudo chown"))
    assert chown.split()[2:4] == [str(UID), "tenants.toml"]
    os.chown(tenants, UID, -1)
    accepted = pm.podman(*args, check=False)
    assert accepted.returncode == 0, accepted.stderr


def compose_steps() -> list[str]:
    """The Compose section's command block of docs/deployment.md."""
    docs = (REPO_ROOT / "docs" / "deployment.md").read_text()
    block = docs[docs.index("## Compose"):].split("```\n", 2)[1]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_envoy_checks_each_gateways_certificate_name() -> None:
    envoy = yaml.safe_load((COMPOSE / "envoy-tls.yaml").read_text())
    for cluster in envoy["static_resources"]["clusters"]:
        context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
        names = {(m["san_type"], m["matcher"]["exact"])
                 for m in context["validation_context"]["match_typed_subject_alt_names"]}
        hosts = {e["endpoint"]["address"]["socket_address"]["address"]
                 for e in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]}
        assert names == {("DNS", host) for host in hosts}, cluster["name"]
        assert context["validation_context"]["trusted_ca"] == {"filename": "/etc/envoy/ca.crt"}
