"""The load tools users run: ghz configs whose data is a valid request, and the locustfile
driven headless against a real gateway; both refuse anything but loopback."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from loadtests import ghz
from loadtests.requests import NotLoopbackError, require_loopback
from modelgate_pb import grpc_service_pb2 as pb
from tests.support.gateway import REPO_ROOT, RunningGateway, running_gateway

GHZ_DIR = REPO_ROOT / "loadtests" / "ghz"


@pytest.fixture(scope="module")
def gateway() -> Iterator[RunningGateway]:
    with running_gateway() as gw:
        yield gw


@pytest.mark.parametrize("target", ["10.0.0.1:8001", "example.com:8001", "0.0.0.0:8001"])
def test_only_loopback_targets(target: str) -> None:
    with pytest.raises(NotLoopbackError):
        require_loopback(target)


@pytest.mark.parametrize("target", ["127.0.0.1:8001", "localhost:8001", "[::1]:8001"])
def test_loopback_targets_pass(target: str) -> None:
    assert require_loopback(target) == target


@pytest.mark.parametrize("model", ["digits", "iris", "species", "cnn"])
def test_generated_ghz_config_is_a_valid_call(
    gateway: RunningGateway, model: str, tmp_path: Path
) -> None:
    out = tmp_path / f"{model}.json"
    assert ghz.main(["--target", gateway.target, "--model", model, "--batch", "2",
                     "--out", str(out)]) == 0
    config = json.loads(out.read_text())
    assert config["call"] == "inference.GRPCInferenceService.ModelInfer"
    assert config["total"] > 0 and config["duration"]
    request = json_format.ParseDict(config["data"], pb.ModelInferRequest())
    response = gateway.stub().ModelInfer(request, timeout=30)
    assert response.model_name == model and len(response.outputs) >= 1


def _streamed(
    gateway: RunningGateway, config: dict[str, object]
) -> list[pb.ModelStreamInferResponse]:
    """A stream config's messages sent as one ModelStreamInfer stream, as ghz sends them."""
    assert isinstance(config["data"], list)
    messages = [json_format.ParseDict(d, pb.ModelInferRequest()) for d in config["data"]]
    return list(gateway.stub().ModelStreamInfer(iter(messages), timeout=30))


@pytest.mark.parametrize("path", sorted(GHZ_DIR.glob("*.json")), ids=lambda p: p.name)
def test_checked_in_ghz_configs_work(gateway: RunningGateway, path: Path) -> None:
    config = json.loads(path.read_text())
    require_loopback(config["host"])
    if config["call"] == ghz.STREAM_CALL:
        answers = _streamed(gateway, config)
        assert len(answers) == config["stream-call-count"]
        assert all(a.infer_response.outputs and not a.error_message for a in answers)
        return
    request = json_format.ParseDict(config["data"], pb.ModelInferRequest())
    assert gateway.stub().ModelInfer(request, timeout=30).outputs


def test_checked_in_ghz_configs_exist() -> None:
    assert {p.stem for p in GHZ_DIR.glob("*.json")} >= {"digits", "iris", "digits-stream"}


def test_generated_ghz_stream_config_is_a_valid_stream(
    gateway: RunningGateway, tmp_path: Path
) -> None:
    out = tmp_path / "stream.json"
    assert ghz.main(["--target", gateway.target, "--model", "digits", "--stream", "8",
                     "--out", str(out)]) == 0
    config = json.loads(out.read_text())
    assert config["call"] == "inference.GRPCInferenceService.ModelStreamInfer"
    answers = _streamed(gateway, config)
    assert sorted(a.infer_response.id for a in answers) == sorted(str(i) for i in range(8))
    assert not [a.error_message for a in answers if a.error_message]


def test_locust_stream_user_headless_run(gateway: RunningGateway, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtests" / "locustfile.py"),
         "StreamUser", "--headless", "-u", "2", "-r", "2", "--run-time", "3s",
         "--host", gateway.target, "--model", "digits", "--in-flight", "8",
         "--max-requests", "2000", "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    assert int(rows["ModelStreamInfer digits"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0


def test_locust_headless_run(gateway: RunningGateway, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "locust", "-f", str(REPO_ROOT / "loadtests" / "locustfile.py"),
         "--headless", "-u", "4", "-r", "4", "--run-time", "3s", "--host", gateway.target,
         "--model", "iris", "--batch", "2", "--max-requests", "500",
         "--csv", str(tmp_path / "run"), "--only-summary"],
        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    with (tmp_path / "run_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    total = rows["Aggregated"]
    assert int(total["Request Count"]) > 0
    assert int(total["Failure Count"]) == 0
    assert "ModelInfer iris" in rows
