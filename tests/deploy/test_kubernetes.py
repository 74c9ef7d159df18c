"""deploy/kubernetes: every manifest round-trips through the kubernetes client's typed
models (a misspelled field is dropped, so it shows), the gateway's flags, variables and
files pass --check-config in the image after the store sync ran, and probes, ports,
workers and grace periods agree with the settings."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from gateway.process import cli
from gateway.settings import Settings, load_settings
from tests.deploy import podman as pm
from tests.support.gateway import REPO_ROOT

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
MODELS = {
    "ConfigMap": "V1ConfigMap", "Secret": "V1Secret", "Service": "V1Service",
    "Deployment": "V1Deployment", "PersistentVolumeClaim": "V1PersistentVolumeClaim",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
    "PodDisruptionBudget": "V1PodDisruptionBudget", "NetworkPolicy": "V1NetworkPolicy",
}
UID = 10001


def documents() -> list[dict[str, Any]]:
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    listed = set(kustomization["resources"])
    assert listed == {p.name for p in KUBERNETES.glob("*.yaml")} - {"kustomization.yaml"}
    return [doc for name in sorted(listed)
            for doc in yaml.safe_load_all((KUBERNETES / name).read_text()) if doc]


def by_name(kind: str, name: str) -> dict[str, Any]:
    return next(d for d in documents() if d["kind"] == kind and d["metadata"]["name"] == name)


def typed(document: dict[str, Any]) -> Any:
    client = ApiClient()
    return client._ApiClient__deserialize(document, MODELS[document["kind"]])  # type: ignore[attr-defined]


def test_every_manifest_round_trips_through_the_typed_models() -> None:
    docs = documents()
    assert {d["kind"] for d in docs} == set(MODELS)
    client = ApiClient()
    for document in docs:
        back = client.sanitize_for_serialization(typed(document))
        assert back == document, f"{document['kind']} {document['metadata']['name']}"


def test_a_misspelled_field_does_not_round_trip() -> None:
    deployment = by_name("Deployment", "modelgate")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    back = ApiClient().sanitize_for_serialization(typed(deployment))
    assert back != deployment


def gateway_container() -> dict[str, Any]:
    spec = by_name("Deployment", "modelgate")["spec"]["template"]["spec"]
    container: dict[str, Any] = next(c for c in spec["containers"] if c["name"] == "gateway")
    return container


def mounted_files(tmp_path: Path) -> dict[str, Path]:
    """The gateway container's mounts as host folders holding what the manifests put
    there (ConfigMap and Secret keys), the store synced by the manifests' own script."""
    config = by_name("ConfigMap", "modelgate-config")["data"]
    tenants = by_name("Secret", "modelgate-tenants")["stringData"]
    sync = by_name("ConfigMap", "modelgate-store-sync")["data"]
    folders: dict[str, Path] = {}
    for name, content in (("config", config), ("tenants", tenants), ("sync", sync)):
        folder = tmp_path / name
        folder.mkdir()
        for key, text in content.items():
            (folder / key).write_text(text)
        folders[name] = folder
    source = tmp_path / "source"
    shutil.copytree(REPO_ROOT / "gateway" / "demo_store", source)
    store = tmp_path / "store"
    store.mkdir()
    for path in (tmp_path, *tmp_path.rglob("*")):
        os.chown(path, UID, UID)
    return {**folders, "source": source, "store": store}


@pytest.mark.container
@pytest.mark.timeout(1800)
def test_the_gateway_command_passes_check_config_after_the_store_sync(tmp_path: Path) -> None:
    pm.build_image()
    files = mounted_files(tmp_path)
    # The init container's command, with its mounts.
    sync = pm.podman(
        "run", "--rm", "--network", "host", "--read-only", "--entrypoint", "/bin/sh",
        "--volume", f"{files['source']}:/source:ro", "--volume", f"{files['store']}:/models",
        "--volume", f"{files['config']}:/routing:ro", "--volume", f"{files['sync']}:/sync:ro",
        pm.IMAGE, "/sync/sync.sh", check=False)
    assert sync.returncode == 0, sync.stderr
    assert (files["store"] / "iris" / "routing.toml").read_text() == (
        files["config"] / "iris.routing.toml").read_text()
    assert (files["store"] / "iris" / "2" / "model.onnx").is_file()
    container = gateway_container()
    mounts = {"/etc/modelgate/gateway.toml": f"{files['config'] / 'gateway.toml'}",
              "/etc/modelgate/tenants": str(files["tenants"]), "/models": str(files["store"])}
    assert {m["mountPath"] for m in container["volumeMounts"]} >= set(mounts)
    args = ["run", "--rm", "--network", "host", "--read-only"]
    for target, source in mounts.items():
        args += ["--volume", f"{source}:{target}:ro"]
    for variable in container["env"]:
        args += ["--env", f"{variable['name']}={variable['value']}"]
    result = pm.podman(*args, pm.IMAGE, *container["args"], "--check-config", check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "model iris: versions 1, 2" in result.stdout


def settings_of_manifests() -> Settings:
    """The settings the gateway container would build, from the same layers."""
    container = gateway_container()
    config = by_name("ConfigMap", "modelgate-config")["data"]["gateway.toml"]
    args = cli._parser().parse_args(
        [a for a in container["args"] if not a.startswith("--config")])
    flags = {f: getattr(args, f) for f in Settings.__dataclass_fields__
             if hasattr(args, f) and getattr(args, f) is not None}
    environ = {v["name"]: v["value"] for v in container["env"]}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelgate-k8s-{os.getpid()}.toml"
    # Paths in the file are the container's; only the values checked here matter.
    text = "\n".join(line for line in config.splitlines()
                     if not line.startswith(("store", "tenants")))
    path.write_text(text)
    try:
        return load_settings(path, environ, flags)
    finally:
        path.unlink()


def test_probes_ports_workers_and_grace_agree_with_the_settings() -> None:
    settings = settings_of_manifests()
    container = gateway_container()
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port,
                     "http": settings.http_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert settings.workers == str(int(container["resources"]["limits"]["cpu"]))
    spec = by_name("Deployment", "modelgate")["spec"]["template"]["spec"]
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > settings.grace_period_s + int(pre_stop[1])
    assert spec["securityContext"]["runAsUser"] == UID
    services = {d["metadata"]["name"]: d["spec"] for d in documents() if d["kind"] == "Service"}
    assert services["modelgate-grpc"]["clusterIP"] == "None"  # per-call balancing by clients
    assert services["modelgate-grpc"]["ports"][0]["targetPort"] == "grpc"
    assert services["modelgate-metrics"]["ports"][0]["targetPort"] == "metrics"
    assert services["modelgate-http"]["ports"][0]["targetPort"] == "http"
    assert settings.host == "0.0.0.0" and settings.redis_url.startswith("redis://modelgate-redis")
