"""Settings layering (defaults <- TOML <- MODELGATE_* <- flags), start-up errors with exit
code 2, and the real `modelgate serve` process: demo store from any folder, SIGTERM drain."""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.process.cli import _parser
from gateway.settings import Settings, SettingsError, demo_store, load_settings
from tests.support import models
from tests.support.gateway import REPO_ROOT, GatewayProcess, free_port


def test_defaults() -> None:
    settings = load_settings(None, {}, {})
    assert settings == Settings()
    assert settings.store == demo_store() and settings.store.is_dir()
    assert (settings.host, settings.grpc_port, settings.metrics_port) == ("127.0.0.1", 8001, 8002)
    assert settings.max_message_bytes == 64 * 1024 * 1024


def test_flags_beat_environment_beats_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text('grpc_port = 9000\nmetrics_port = 9001\nhost = "0.0.0.0"\n')
    env = {"MODELGATE_GRPC_PORT": "9100", "MODELGATE_METRICS_PORT": "9101"}
    settings = load_settings(config, env, {"grpc_port": "9200"})
    assert settings.grpc_port == 9200  # flag
    assert settings.metrics_port == 9101  # environment over file
    assert settings.host == "0.0.0.0"  # file over default


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"MODELGATE_GRPC_PORT": "70000"}, "setting 'grpc_port' (from MODELGATE_GRPC_PORT)"),
        ({"MODELGATE_GRPC_PORT": "abc"}, "expected int, got 'abc'"),
        ({"MODELGATE_STORE": "/no/such/folder"}, "setting 'store'"),
        ({"MODELGATE_DEVICE": "tpu"}, "must be auto, cpu or cuda"),
        ({"MODELGATE_GRACE_PERIOD_S": "-1"}, "setting 'grace_period_s'"),
    ],
)
def test_bad_values_name_the_setting(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        load_settings(None, env, {})
    assert needle in str(excinfo.value)


def test_unknown_key_in_config_file(tmp_path: Path) -> None:
    config = tmp_path / "gateway.toml"
    config.write_text("grpc_prot = 1\n")
    with pytest.raises(SettingsError, match=r"'grpc_prot'.*unknown setting"):
        load_settings(config, {}, {})


def _modelgate(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway.process.cli", *args],
        capture_output=True, text=True, cwd=cwd, check=False, timeout=60,
        env={"PYTHONPATH": str(REPO_ROOT), "PATH": "/usr/bin:/bin"},
    )


def test_bad_flag_exits_2_with_one_line(tmp_path: Path) -> None:
    result = _modelgate("serve", "--grpc-port", "-5", cwd=tmp_path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["modelgate: error: setting 'grpc_port' (from --grpc-port): "
                     "must be a port number 0..65535"]


def test_unreadable_config_exits_2(tmp_path: Path) -> None:
    result = _modelgate("serve", "--config", str(tmp_path / "missing.toml"), cwd=tmp_path)
    assert result.returncode == 2
    assert "setting 'config'" in result.stderr


def test_serves_the_demo_store_from_any_folder(tmp_path: Path) -> None:
    with GatewayProcess(cwd=tmp_path) as gw:
        client = tc.InferenceServerClient(gw.target)
        names = {m.name for m in client.get_model_repository_index().models}
        assert {"iris", "digits", "species"} <= names
        assert client.get_model_metadata("iris").versions == ["1", "2"]
        species = tc.InferInput("name", [1, 1], "BYTES")
        species.set_data_from_numpy(np.array([[b"virginica"]], dtype=object))
        assert client.infer("species", [species]).as_numpy("class_id").tolist() == [[2]]
        client.close()
        assert gw.stop() == 0
    log = gw.log()
    # One line says which execution provider runs; ONNX Runtime's CUDA noise never shows.
    assert log.count("onnxruntime: using") == 1
    assert "Failed to load library" not in log and "onnxruntime_src" not in log


def _slow_model_store(root: Path) -> Path:
    """A model whose one request takes a noticeable while (a chain of matrix products)."""
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.eye(256, dtype=np.float32), "w")
    nodes, last = [], "x"
    for i in range(200):
        nodes.append(helper.make_node("MatMul", [last, "w"], [f"h{i}"]))
        last = f"h{i}"
    nodes.append(helper.make_node("Identity", [last], ["y"]))
    graph = helper.make_graph(
        nodes, "slow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 256])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    config = models.config_pbtxt("slow", [("x", "FP32", [256])], [("y", "FP32", [256])],
                                 max_batch_size=512)
    models.write_model(root, "slow", 1, model, config)
    return root


def test_sigterm_drains_in_flight_requests_and_exits_0(tmp_path: Path) -> None:
    store = _slow_model_store(tmp_path / "store")
    with GatewayProcess(["--store", str(store), "--grace-period-s", "30"]) as gw:
        client = tc.InferenceServerClient(gw.target)
        x = tc.InferInput("x", [512, 256], "FP32")
        data = np.random.default_rng(0).random((512, 256), dtype=np.float32)
        x.set_data_from_numpy(data)
        results: list[object] = []
        started = threading.Event()

        def call() -> None:
            started.set()
            try:
                results.append(client.infer("slow", [x], client_timeout=60).as_numpy("y"))
            except Exception as exc:
                results.append(exc)

        worker = threading.Thread(target=call)
        worker.start()
        started.wait()
        # Wait until the request reached the server (its log shows nothing per request, so
        # give the call a moment; the assertion below holds either way).
        worker.join(0.3)
        code = gw.stop()
        worker.join(60)
        client.close()
    assert code == 0, gw.log()
    assert len(results) == 1
    assert isinstance(results[0], np.ndarray), results[0]
    np.testing.assert_allclose(results[0], data, rtol=1e-4)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_busy_metrics_port_is_reported_as_metrics_port(tmp_path: Path, workers: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Several workers need a fixed gRPC port; the supervisor binds the metrics port first.
        result = _modelgate("serve", "--grpc-port", str(free_port()), "--metrics-port",
                            str(port), "--workers", workers, cwd=tmp_path)
    assert result.returncode == 2
    assert f"setting 'metrics_port': cannot bind 127.0.0.1:{port}" in result.stderr
    assert "grpc_port" not in result.stderr


def _helps(parser: argparse.ArgumentParser, prefix: str = "modelgate") -> dict[str, str]:
    """The --help text of the parser and of every subcommand under it, by command line."""
    helps = {prefix: parser.format_help()}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                helps.update(_helps(sub, f"{prefix} {name}"))
    return helps


def test_help_texts_carry_no_markup() -> None:
    helps = _helps(_parser())
    assert {"modelgate", "modelgate serve", "modelgate tenants create"} <= set(helps)
    marked = [command for command, text in helps.items() if "``" in text]
    assert not marked, f"raw RST double backticks in the help of: {marked}"


def test_workers_metrics_are_documented_as_one_merged_port() -> None:
    serve_help = " ".join(_helps(_parser())["modelgate serve"].split())
    assert "one port for all --workers, merged" in serve_help
    page = (REPO_ROOT / "docs" / "observability.md").read_text(encoding="utf-8")
    assert "port + *i*" not in page and "merged" in page
