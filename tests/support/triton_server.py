"""A real Triton Inference Server for tests: the ``tritonserver`` binary of the nvidia-pytriton
wheel (in its own virtualenv), a model repository of Python-backend models running ONNX files."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from loadtests.peer_models import RUNNER_HEAD
from loadtests.servers import children
from tests.support.gateway import REPO_ROOT, free_port
from tests.support.models import (
    ONNX_TYPES,
    add_constant,
    add_model_config,
    all_types_config,
    config_pbtxt,
    identity_all_types,
)
from tests.support.waiting import wait_server_ready

TRITON_VENV: Final = REPO_ROOT / ".triton-venv"
INSTALL_SCRIPT: Final = REPO_ROOT / "scripts" / "install_test_deps.sh"
STUB: Final = "triton_python_backend_stub"

# Runs every request alone; parameter delay_ms slows each (a slow upstream on demand).
ONNX_RUNNER: Final = RUNNER_HEAD + '''import json, time


class TritonPythonModel:
    """Runs <version>/model.onnx with onnxruntime; parameter delay_ms slows every request."""

    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.session, self.inputs, self.outputs = open_session(args)
        delay = config.get("parameters", {}).get("delay_ms", {}).get("string_value", "0")
        self.delay = float(delay) / 1000.0

    def execute(self, requests):
        responses = []
        for request in requests:
            if self.delay:
                time.sleep(self.delay)
            feeds = {}
            for name in self.inputs:
                array = pb_utils.get_input_tensor_by_name(request, name).as_numpy()
                if array.dtype == object:
                    array = np.vectorize(lambda b: b.decode("utf-8"), otypes=[object])(array)
                feeds[name] = array
            wanted = list(request.requested_output_names()) or self.outputs
            results = self.session.run(wanted, feeds)
            tensors = []
            for name, value in zip(wanted, results):
                if value.dtype.kind in "OU":
                    value = np.vectorize(lambda s: s.encode("utf-8"), otypes=[object])(value)
                tensors.append(pb_utils.Tensor(name, value))
            responses.append(pb_utils.InferenceResponse(tensors))
        return responses
'''


def _die_with_parent(command: list[str]) -> list[str]:
    """The command run through util-linux's setpriv so that the kernel kills tritonserver
    when the thread that started it dies (PR_SET_PDEATHSIG): a killed test run leaves no
    server behind. Not a preexec_fn: Python code between fork and exec can deadlock in a
    process with threads (gRPC's), and did."""
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *command] if setpriv else command


@dataclass(frozen=True)
class TritonInstall:
    """Where the pieces of the wheel are: the binary, the Python backend, the stubs."""

    site_packages: Path

    @property
    def root(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def libs(self) -> Path:
        return self.site_packages / "nvidia_pytriton.libs"


def _site_packages(venv: Path) -> Path | None:
    found = sorted(venv.glob("lib/python3.*/site-packages/pytriton/tritonserver/bin/tritonserver"))
    return found[0].parents[3] if found else None


def triton_install() -> TritonInstall:
    """Locate the wheel in .triton-venv, running the install script once if it is missing."""
    site = _site_packages(TRITON_VENV)
    if site is None:
        subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True, cwd=REPO_ROOT)
        site = _site_packages(TRITON_VENV)
    if site is None:
        raise RuntimeError(f"{INSTALL_SCRIPT} ran but {TRITON_VENV} has no tritonserver")
    return TritonInstall(site)


def backend_directory(install: TritonInstall, into: Path) -> Path:
    """A backend folder whose python/ holds the backend and the stub for this interpreter
    (the wheel keeps the stubs apart, one per Python version, and Triton looks for the stub
    beside libtriton_python.so)."""
    python = into / "backends" / "python"
    python.mkdir(parents=True, exist_ok=True)
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": install.root / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": install.root / "backends" / "python"
        / "triton_python_backend_utils.py",
        STUB: install.root / "python_backend_stubs" / version / STUB,
    }
    for name, source in sources.items():
        if not source.exists():
            raise RuntimeError(f"the nvidia-pytriton wheel lacks {source}")
        link = python / name
        if not link.exists():
            link.symlink_to(source)
    return into / "backends"


def write_python_model(repo: Path, name: str, onnx_bytes: bytes, config: str) -> None:
    """A Python-backend model ``name`` (version 1) running ``onnx_bytes`` with onnxruntime."""
    folder = repo / name / "1"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(onnx_bytes)
    (folder / "model.py").write_text(ONNX_RUNNER, encoding="utf-8")
    config = config.replace('platform: "onnxruntime_onnx"', 'backend: "python"')
    config += 'instance_group [ { kind: KIND_CPU count: 1 } ]\n'
    (repo / name / "config.pbtxt").write_text(config, encoding="utf-8")


TYPED: Final = tuple(t for t in ONNX_TYPES if t != "FP16")  # FP16 travels only raw


def identity_typed() -> bytes:
    """identity_all_types() less FP16: every datatype that typed contents can carry."""
    model = identity_all_types()
    keep = {f"in_{t}" for t in TYPED} | {f"out_{t}" for t in TYPED}
    for part in (model.graph.input, model.graph.output):
        for value in [v for v in part if v.name not in keep]:
            part.remove(value)
    for node in [n for n in model.graph.node if n.input[0] not in keep]:
        model.graph.node.remove(node)
    return model.SerializeToString()


ALL_MODELS: Final = ("all_types", "all_types_typed", "add", "add_slow")


def write_triton_repository(repo: Path, models: tuple[str, ...] = ALL_MODELS) -> Path:
    """The upstream repository the tests use (each Python-backend model costs a stub
    process, so only the ``models`` asked for): ``all_types`` (identity over every datatype
    ONNX Runtime takes), ``all_types_typed`` (the same less FP16), ``add`` (y = x + 1,
    doubled = 2x) and ``add_slow`` (add, 300 ms a request)."""
    add = add_constant(1.0).SerializeToString()
    slow = 'parameters { key: "delay_ms" value { string_value: "300" } }\n'
    typed = config_pbtxt("all_types_typed", [(f"in_{t}", t, [3]) for t in TYPED],
                         [(f"out_{t}", t, [3]) for t in TYPED])
    writers = {
        "all_types": lambda: write_python_model(
            repo, "all_types", identity_all_types().SerializeToString(),
            all_types_config("all_types")),
        "all_types_typed": lambda: write_python_model(
            repo, "all_types_typed", identity_typed(), typed),
        "add": lambda: write_python_model(repo, "add", add, add_model_config("add")),
        "add_slow": lambda: write_python_model(
            repo, "add_slow", add, add_model_config("add_slow", extra=slow)),
    }
    for name in models:
        writers[name]()
    return repo


class TritonServer:
    """One ``tritonserver`` process on 127.0.0.1:``port`` (gRPC only); restartable on the
    same port so a gateway can see it come back."""

    def __init__(self, install: TritonInstall, repository: Path, workdir: Path,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.install = install
        self.repository = repository
        self.extra_args = extra_args
        self.port = free_port()
        self.backends = backend_directory(install, workdir)
        self.log_path = workdir / f"tritonserver-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 90) -> None:
        """Start and wait until ServerReady; raise with the log tail if it dies."""
        self.spawn()
        self.wait_ready(timeout)

    def spawn(self) -> None:
        """Start the process without waiting for it."""
        env = {
            **os.environ,
            "PYTHONPATH": str(self.install.site_packages),
            "LD_LIBRARY_PATH": str(self.install.libs),
        }
        command = [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.backends}",
            "--grpc-address=127.0.0.1", f"--grpc-port={self.port}",
            "--allow-http=false", "--allow-metrics=false", "--allow-gpu-metrics=false",
            "--exit-timeout-secs=2", "--log-verbose=0", *self.extra_args,
        ]
        log = self.log_path.open("ab")
        try:
            self.proc = subprocess.Popen(_die_with_parent(command), stdout=log,
                                         stderr=subprocess.STDOUT, env=env)
        finally:
            log.close()

    def wait_ready(self, timeout: float) -> None:
        wait_server_ready(self.target, self.proc, "tritonserver", self.log, timeout)

    def log(self) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(line for line in text.splitlines() if not line.startswith("+"))[-4000:]

    def kill(self) -> None:
        """SIGKILL: in-flight requests see their connection drop, as in a crash. The Python
        backend's stub processes outlive a killed server (reparented, still running), so
        they are killed too: a test run leaves no process behind."""
        if self.proc is not None and self.proc.poll() is None:
            stubs = children(self.proc.pid)
            self.proc.kill()
            self.proc.wait(30)
            for pid in stubs:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)


@contextlib.contextmanager
def triton_servers(count: int = 1, models: tuple[str, ...] = ALL_MODELS
                   ) -> Iterator[list[TritonServer]]:
    """``count`` Triton servers over one model repository, stopped on exit."""
    install = triton_install()
    with tempfile.TemporaryDirectory(prefix="modelgate-triton-") as tmp:
        workdir = Path(tmp)
        repo = write_triton_repository(workdir / "repo", models)
        servers = [TritonServer(install, repo, workdir) for _ in range(count)]
        try:
            for server in servers:  # started together: each takes seconds to load
                server.spawn()
            for server in servers:
                server.wait_ready(90)
            yield servers
        finally:
            for server in servers:
                server.stop()
