"""The gateway's container image, built from the Dockerfile and run with podman: inference
through it from the host, non-root, draining on SIGTERM under load, and what it leaves out.
Marked ``container``; fails (never skips) when podman is missing."""

from __future__ import annotations

import json
import os
import shutil
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as th
from prometheus_client.parser import text_string_to_metric_families

from loadtests.overload import SLOW_WIDTH, slow_store
from tests.deploy import podman as pm
from tests.gateway.tenancy.test_tenants import admin, issue
from tests.support.gateway import REPO_ROOT, free_port
from tests.support.waiting import wait_until

pytestmark = [pytest.mark.container, pytest.mark.timeout(1800)]

UID = 10001
DEMO = REPO_ROOT / "gateway" / "demo_store"
IN_FLIGHT = 12  # slow requests inside the gateway when SIGTERM arrives
LOADERS = 3  # threads calling iris in a loop around the signal


@pytest.fixture(scope="module")
def image() -> str:
    pm.build_image()
    return pm.IMAGE


@dataclass
class Running:
    name: str
    grpc_port: int
    metrics_port: int
    http_port: int
    key: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def get(self, path: str) -> tuple[int, bytes]:
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port}{path}", timeout=5
            ) as answer:
                return answer.status, answer.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()
        except OSError:
            return 0, b""

    def gauge(self, family: str, **labels: str) -> float:
        _, body = self.get("/metrics")
        for metric in text_string_to_metric_families(body.decode()):
            for sample in metric.samples:
                if sample.name == family and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    def state(self) -> dict[str, object]:
        info = json.loads(pm.podman("inspect", self.name).stdout)[0]
        state: dict[str, object] = info["State"]
        return state


def readable_store(root: Path) -> Path:
    """The slow model plus the demo's iris, readable by the image's user."""
    slow_store(root, layers=2048)
    shutil.copytree(DEMO / "iris", root / "iris")
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o755)
        for name in files:
            os.chmod(Path(folder) / name, 0o644)
    return root


@pytest.fixture
def running(image: str, tmp_path: Path) -> Iterator[Running]:
    store = readable_store(tmp_path / "store")
    tenants = tmp_path / "tenants.toml"
    assert admin(tenants, "create", "acme")[0] == 0
    key = issue(tenants, "acme")
    # A secret: readable by the gateway's user only, as a Kubernetes Secret with fsGroup.
    os.chown(tenants, UID, UID)
    os.chmod(tenants, 0o400)
    os.chmod(tmp_path, 0o755)
    gateway = Running(f"modelgate-test-{os.getpid()}", free_port(), free_port(), free_port(),
                      key, {"x-api-key": key})
    pm.podman(
        "run", "--detach", "--name", gateway.name, "--network", "host",
        "--health-interval", "disable",
        "--volume", f"{store}:/models:ro",
        "--volume", f"{tenants}:/etc/modelgate/tenants.toml:ro",
        "--env", "MODELGATE_TENANTS=/etc/modelgate/tenants.toml",
        "--env", f"MODELGATE_GRPC_PORT={gateway.grpc_port}",
        "--env", f"MODELGATE_METRICS_PORT={gateway.metrics_port}",
        "--env", f"MODELGATE_HTTP_PORT={gateway.http_port}",
        "--env", "MODELGATE_GRACE_PERIOD_S=120",
        "--env", "MODELGATE_ACCESS_LOG=-",
        image,
    )
    try:
        wait_until(lambda: gateway.get("/readyz")[0] == 200 or not gateway.state()["Running"],
                   "the container's /readyz", timeout=180, interval=0.2)
        assert gateway.state()["Running"], pm.podman("logs", gateway.name).stderr
        yield gateway
    finally:
        pm.podman("rm", "--force", "--time", "5", gateway.name, check=False)


def infer_iris(client: tc.InferenceServerClient, headers: dict[str, str]) -> np.ndarray:
    data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
    tensor = tc.InferInput("features", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer("iris", [tensor], headers=headers)
    return result.as_numpy("label")  # type: ignore[no-any-return]


def infer_slow(client: tc.InferenceServerClient, headers: dict[str, str]) -> np.ndarray:
    data = np.ones((1, SLOW_WIDTH), dtype=np.float32)
    tensor = tc.InferInput("x", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer("slow", [tensor], headers=headers).as_numpy("y")  # type: ignore[no-any-return]


def serves_from_the_host_as_non_root(running: Running) -> None:
    """Inference from the host over loopback, with and without the tenant's key; the
    HEALTHCHECK; the process's uids."""
    with tc.InferenceServerClient(running.url) as client:
        assert infer_iris(client, running.headers).shape[0] == 1
        with pytest.raises(tc.InferenceServerException) as refused:
            infer_iris(client, {})
        assert "UNAUTHENTICATED" in str(refused.value.status())
    # The same over the REST port.
    with th.InferenceServerClient(f"127.0.0.1:{running.http_port}") as rest:
        data = np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)
        tensor = th.InferInput("features", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        # A copy: tritonclient.http adds its own (int-valued) headers to the dict it is given.
        answer = rest.infer("iris", [tensor], headers=dict(running.headers))
        assert answer.as_numpy("label").shape[0] == 1
    # The image's HEALTHCHECK passes once ready.
    assert pm.podman("healthcheck", "run", running.name, check=False).returncode == 0
    # The process runs as the image's user, seen from the host's /proc.
    pid = int(str(running.state()["Pid"]))
    uids = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("Uid:")).split()[1:]
    assert uids == [str(UID)] * 4


def inference_codes(access_log: str) -> dict[tuple[str, str], int]:
    """(model, code) -> gRPC ModelInfer calls, from the gateway's JSON access log."""
    codes: dict[tuple[str, str], int] = {}
    for line in access_log.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry["method"].endswith("ModelInfer") and entry.get("protocol") == "grpc":
                key = (entry["model"], entry["code"])
                codes[key] = codes.get(key, 0) + 1
    return codes


def test_serves_from_the_host_as_non_root_and_drains_on_sigterm(running: Running) -> None:
    serves_from_the_host_as_non_root(running)
    # Load: LOADERS threads call iris in a loop; IN_FLIGHT slow requests are sent at once.
    stop = threading.Event()
    signalled = threading.Event()
    before: list[str] = []  # failures before SIGTERM: none allowed
    after: list[str] = []  # failures after SIGTERM: refusals of new calls only
    served = [0] * LOADERS

    def loader(index: int) -> None:
        with tc.InferenceServerClient(running.url) as client:
            while not stop.is_set():
                was_signalled = signalled.is_set()
                try:
                    infer_iris(client, running.headers)
                    served[index] += 1
                except tc.InferenceServerException as exc:
                    (after if was_signalled else before).append(str(exc.status()))
                    if was_signalled:
                        return

    slow_results: list[str] = []
    lock = threading.Lock()

    def slow() -> None:
        with tc.InferenceServerClient(running.url) as client:
            try:
                out = infer_slow(client, running.headers)
                outcome = "ok" if out.shape == (1, SLOW_WIDTH) else f"shape {out.shape}"
            except tc.InferenceServerException as exc:
                outcome = str(exc.status())
        with lock:
            slow_results.append(outcome)

    loaders = [threading.Thread(target=loader, args=(i,)) for i in range(LOADERS)]
    for thread in loaders:
        thread.start()
    wait_until(lambda: all(served), "every loader served", timeout=60)
    slows = [threading.Thread(target=slow) for _ in range(IN_FLIGHT)]
    for thread in slows:
        thread.start()
    # Every slow request is inside the gateway (in its runtime, or already answered).
    wait_until(lambda: running.gauge("modelgate_inference_in_flight", model="slow")
               + len(slow_results) >= IN_FLIGHT, "the slow requests inside the gateway",
               timeout=60, interval=0.01)
    answered_at_signal = len(slow_results)
    signalled.set()
    pm.podman("kill", "--signal", "TERM", running.name)
    for thread in slows:
        thread.join(180)
    stop.set()
    for thread in loaders:
        thread.join(60)
    exit_code = pm.podman("wait", running.name, timeout=180).stdout.strip()
    logs = pm.podman("logs", running.name)
    assert answered_at_signal < IN_FLIGHT, "no request was in flight at the signal"
    assert slow_results == ["ok"] * IN_FLIGHT, slow_results
    assert before == []
    assert exit_code == "0", logs.stdout + logs.stderr
    assert "draining" in logs.stderr
    # The gateway's own record: every inference call it took in was answered OK (the one
    # refusal is the keyless call above), and each one the clients saw succeed is there.
    # Calls made after the signal the gateway never took in are refused at the connection:
    # UNAVAILABLE, or CANCELLED for a stream open while the server closed.
    assert inference_codes(logs.stdout) == {
        ("iris", "OK"): sum(served) + 1, ("iris", "UNAUTHENTICATED"): 1, ("slow", "OK"): IN_FLIGHT,
    }
    assert set(after) <= {"StatusCode.UNAVAILABLE", "StatusCode.CANCELLED"}, after


def test_image_has_no_compiler_no_pip_and_no_test_dependency(image: str) -> None:
    script = r"""
import importlib.metadata as md, json, re, shutil, sys, tomllib
test = tomllib.load(open(sys.argv[1], "rb"))["project"]["optional-dependencies"]["test"]
name = lambda spec: re.split(r"[\[<>=!~; ]", spec, maxsplit=1)[0].lower().replace("_", "-")
required = set()
for dist in md.distributions():
    for spec in dist.requires or []:
        if "extra ==" not in spec:
            required.add(name(spec))
installed = {name(d.metadata["Name"]) for d in md.distributions()}
print(json.dumps({
    "compilers": [c for c in ("cc", "gcc", "g++", "c++", "clang", "x86_64-linux-gnu-gcc",
                              "ld", "make") if shutil.which(c)],
    "test_only": sorted(n for n in map(name, test) if n in installed and n not in required),
    "pip": "pip" in installed,
    "python": sys.version_info[:2],
    "count": len(installed),
}))
"""
    result = pm.podman("run", "--rm", "--network", "host", "--entrypoint",
                       "/opt/modelgate/bin/python", "--volume",
                       f"{REPO_ROOT / 'pyproject.toml'}:/tmp/pyproject.toml:ro",
                       pm.IMAGE, "-c", script, "/tmp/pyproject.toml")
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["count"] > 10  # the runtime's distributions are there to look at
    assert found["compilers"] == []
    assert found["test_only"] == []
    assert found["pip"] is False
    inspected = json.loads(pm.podman("image", "inspect", pm.IMAGE).stdout)[0]
    config = inspected["Config"]
    assert str(config["User"]) == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["/opt/modelgate/bin/modelgate"]
    assert {"8000/tcp", "8001/tcp", "8002/tcp"} <= set(config["ExposedPorts"])
    assert "/readyz" in " ".join(inspected["Healthcheck"]["Test"])
