"""deploy/compose: `podman-compose config` parses the stack (with and without the TLS
override), and each gateway service's command line and environment, with its files
mounted as the stack mounts them, pass `modelgate serve --check-config` in the image."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as tc
import yaml

from tests.deploy import podman as pm
from tests.deploy.test_container import infer_iris
from tests.deploy.test_observability import dashboard_queries
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.certs import CertificateAuthority
from tests.support.gateway import REPO_ROOT, free_port
from tests.support.waiting import wait_until

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


CORE = Path(__file__).resolve().parent / "compose.core.yaml"
CORE_SERVICES = ("redis", "gateway-1", "gateway-2", "envoy")
DAILY = 10  # the tenant's requests per day: exact whichever gateway serves a call
NGINX = """worker_processes 1;
pid /tmp/nginx.pid;
error_log stderr warn;
events {{}}
http {{
  access_log off;
  # No upstream keepalive: each call opens its own upstream stream, balanced round robin.
  upstream gateways {{ server 127.0.0.1:{one}; server 127.0.0.1:{two}; }}
  server {{
    listen 127.0.0.1:{port} http2;
    location / {{ grpc_pass grpc://gateways; }}
  }}
}}
"""


def compose(project: str, env: dict[str, str], *args: str,
            timeout: float = 600) -> subprocess.CompletedProcess[str]:
    executable = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    assert executable is not None, "podman-compose is not installed (a test extra)"
    return subprocess.run(
        [executable, "-p", project, "-f", str(COMPOSE / "compose.yaml"), "-f", str(CORE), *args],
        capture_output=True, text=True, timeout=timeout, cwd=COMPOSE, check=False,
        env={**pm.environment(), **env})


def test_two_gateways_behind_the_balancer_share_a_tenants_quota_through_redis(
    image: str, tmp_path: Path
) -> None:
    pm.build_services()
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "acme", "--requests-per-day", str(DAILY))[0] == 0
    key = issue(tenants, "acme")
    os.chown(tenants, UID, -1)  # the docs' chown step
    os.chmod(tmp_path, 0o755)
    ports = {name: free_port() for name in (
        "CORE_REDIS_PORT", "CORE_GRPC_1", "CORE_HTTP_1", "CORE_METRICS_1", "CORE_GRPC_2",
        "CORE_HTTP_2", "CORE_METRICS_2", "LB")}
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX.format(one=ports["CORE_GRPC_1"], two=ports["CORE_GRPC_2"],
                                 port=ports["LB"]))
    env = {**{k: str(v) for k, v in ports.items()}, "CORE_TENANTS": str(tenants),
           "CORE_NGINX_CONF": str(conf)}
    # The override changes the gateways' command only where the host network needs it.
    stack = compose_config("compose.yaml")["services"]["gateway-1"]["command"]
    core = yaml.safe_load(compose(f"core-config-{os.getpid()}", env, "config").stdout)
    kept = [a for a in stack if not a.startswith(("--triton", "--otlp", "--redis-url"))]
    assert [a for a in core["services"]["gateway-1"]["command"]
            if not a.startswith("--redis-url")] == kept
    project = f"modelgate-core-{os.getpid()}"
    try:
        up = compose(project, env, "up", "-d", "--no-build", "--no-deps", *CORE_SERVICES)
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        for metrics in (ports["CORE_METRICS_1"], ports["CORE_METRICS_2"]):
            wait_until(lambda m=metrics: ready(m), f"the gateway on metrics port {metrics}",
                       timeout=300, interval=0.5)
        outcomes = []
        with tc.InferenceServerClient(f"127.0.0.1:{ports['LB']}") as client:
            for _ in range(3 * DAILY):
                try:
                    infer_iris(client, {"x-api-key": key})
                    outcomes.append("OK")
                except tc.InferenceServerException as exc:
                    outcomes.append(str(exc.status()))
        assert outcomes.count("OK") == DAILY, outcomes
        assert set(outcomes) == {"OK", "StatusCode.RESOURCE_EXHAUSTED"}, outcomes
        # Each gateway served some of the calls, and their access logs add up to the client's.
        served = {name: access_codes(project, name) for name in ("gateway-1", "gateway-2")}
        assert all(codes.get("OK", 0) > 0 for codes in served.values()), served
        assert sum(codes.get("OK", 0) for codes in served.values()) == DAILY, served
        assert sum(sum(codes.values()) for codes in served.values()) == 3 * DAILY, served
    finally:
        compose(project, env, "down", "-t", "5", timeout=300)


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as answer:
            return bool(answer.status == 200)
    except OSError:
        return False


def access_codes(project: str, service: str) -> dict[str, int]:
    """gRPC ModelInfer codes in one service's JSON access log (its container's stdout)."""
    listed = pm.podman("ps", "-a", "--filter", f"label=io.podman.compose.project={project}",
                       "--filter", f"label=com.docker.compose.service={service}",
                       "--format", "{{.Names}}").stdout.split()
    assert len(listed) == 1, listed
    codes: dict[str, int] = {}
    for line in pm.podman("logs", listed[0]).stdout.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["method"].endswith("ModelInfer"):
                codes[entry["code"]] = codes.get(entry["code"], 0) + 1
    return codes
