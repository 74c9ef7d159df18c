"""The Triton side-by-side's parts that need no Triton: the targets judged from figures, the
report files, the peer models both servers load, and the stream driver against a gateway."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from loadtests.drivers import channels_on, stream_loop
from loadtests.peer_models import (
    BATCHED_RUNNER,
    mlp,
    peer_models,
    write_store,
    write_triton_repository,
)
from loadtests.requests import request_for
from loadtests.versus_report import (
    FORWARD,
    MODELGATE,
    MODELGATE_2,
    NOOP,
    NOOP_2,
    TRITON,
    Figure,
    verdicts,
    write,
)
from modelgate_pb import grpc_service_pb2 as pb
from tests.support.gateway import running_gateway

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _figures(stream_rate: float) -> list[Figure]:
    return [
        Figure(TRITON, "mlp", "stream", 32, 10_000, 30.0, 30.0),
        Figure(NOOP, "mlp", "stream", 32, 15_000, 20.0, 20.0),
        Figure(MODELGATE, "mlp", "stream", 32, stream_rate, 40.0, 40.0),
        Figure(TRITON, "mlp", "unary", 1, 1_000, 1.0, 0.9),
        Figure(MODELGATE, "mlp", "unary", 1, 1_100, 0.9, 0.8),
        Figure(TRITON, "cnn", "unary", 1, 900, 1.1, 1.0),
        Figure(MODELGATE, "cnn", "unary", 1, 800, 1.2, 1.0),
        Figure(TRITON, "mlp", "unary", 32, 10_000, 3.0, 3.0, 80.0),
        Figure(MODELGATE_2, "mlp", "unary", 32, 5_000, 6.0, 6.0, 300.0),
        Figure(NOOP_2, "mlp", "unary", 32, 7_000, 4.0, 4.0),
        Figure(FORWARD, "mlp", "unary", 1, 800, 1.25, 1.1),
        Figure(FORWARD, "mlp", "unary", 32, 2_000, 16.0, 16.0, 350.0),
        Figure(MODELGATE, "mlp", "unary", 32, 3_000, 10.0, 10.0, 400.0),
    ]


def test_verdicts_compare_the_right_figures() -> None:
    judged = {v.target.split(":")[0]: v for v in verdicts(_figures(16_000))}
    assert judged["streaming, batched MLP"].met is True  # 1.6x Triton, 107 % of the no-op
    assert judged["concurrency 1, mlp"].met is True
    assert judged["concurrency 1, cnn"].met is False  # mean 1.2 ms > 1.1 ms
    assert judged["unary, concurrency 32, batched MLP, 2 workers"].met is False  # 0.5x
    assert "0.70x" in judged["unary, concurrency 32, batched MLP, 2 workers"].measured
    assert judged["through the gateway to Triton, c=1, mlp"].met is True  # +250 µs
    assert judged["through the gateway to Triton, c=1, cnn"].met is None  # not measured
    assert judged["forwarding, c=32"].met is True  # 350 <= 400 µs
    slow = verdicts(_figures(12_000))
    assert [v.met for v in slow[:2]] == [False, True]  # 1.2x Triton, 80 % of the no-op


def test_the_report_is_markdown_json_and_a_png(tmp_path: Path) -> None:
    write(tmp_path, _figures(16_000), {"command": "python -m loadtests.versus", "cpus": 2,
                                       "cpu_model": "test CPU", "commit": "abc1234"})
    text = (tmp_path / "versus.md").read_text()
    assert "python -m loadtests.versus" in text and "test CPU" in text and "abc1234" in text
    assert "| modelgate | mlp | stream | 32 | 16,000 |" in text
    data = json.loads((tmp_path / "versus.json").read_text())
    assert len(data["figures"]) == 13 and data["targets"]
    assert (tmp_path / "versus.png").read_bytes().startswith(PNG_SIGNATURE)


def test_both_servers_get_the_same_models(tmp_path: Path) -> None:
    models = peer_models()
    store = write_store(tmp_path / "store", models)
    repo = write_triton_repository(tmp_path / "repo", models)
    for model in models:
        ours = (store / model.name / "1" / "model.onnx").read_bytes()
        assert ours == (repo / model.name / "1" / "model.onnx").read_bytes()
        config = (repo / model.name / "config.pbtxt").read_text()
        assert 'backend: "python"' in config and "platform" not in config
        assert (repo / model.name / "1" / "model.py").read_text() == BATCHED_RUNNER
        batching = "dynamic_batching" in (store / model.name / "config.pbtxt").read_text()
        assert batching == ("dynamic_batching" in config)
    session = ort.InferenceSession(mlp(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {"x": np.ones((3, 64), np.float32)})
    assert out.shape == (3, 10)


def test_the_stream_driver_keeps_messages_in_flight_and_times_each() -> None:
    with running_gateway() as gw:
        async def run() -> tuple[int, dict[str, int]]:
            metadata = pb.ModelMetadataResponse(name="digits")
            metadata.inputs.add(name="pixels", datatype="FP32", shape=[-1, 64])
            async with channels_on(gw.target, 2) as channels:
                window = await stream_loop(channels, request_for(metadata), 2, 4,
                                           duration_s=0.5, warmup_s=0.1)
            assert all(v > 0 for v in window.latencies)
            return len(window.latencies), dict(window.errors)

        answered, errors = asyncio.run(run())
    assert answered > 0 and errors == {}
