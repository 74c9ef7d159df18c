"""The benchmark runner works (not how fast anything is): percentiles, both drivers against
the real gateway for a fraction of a second, the table, and the ONNX Runtime ceiling."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import grpc
import pytest

from gateway.settings import demo_store
from loadtests.ceilings import ort_ceiling
from loadtests.drivers import percentile
from loadtests.results import LevelResult
from loadtests.runner import LevelPlan, format_table, run_levels
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support.gateway import running_gateway

pytestmark = pytest.mark.timeout(120)


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_levels_against_the_real_gateway() -> None:
    with running_gateway() as gw:
        results = asyncio.run(
            run_levels(
                gw.target,
                ["digits"],
                [4],
                [200.0],
                LevelPlan(duration_s=0.3, warmup_s=0.1, channels=2),
            )
        )
    closed, opened = results
    assert (closed.mode, closed.load, opened.mode, opened.load) == ("closed", 4, "open", 200)
    for result in results:
        assert result.requests > 0 and result.errors == {}
        assert result.inferences is not None and result.executions is not None
        assert result.inferences >= result.executions >= 1
        summary = result.summary()
        assert summary["requests"] == result.requests and "p99_ms" in summary
    table = format_table(results, {"digits": {1: 1000.0}})
    assert table.count("| digits |") == 3 and "4 conc" in table and "200 req/s offered" in table


def test_ort_ceiling_measures_rows_per_second() -> None:
    assert ort_ceiling(demo_store() / "digits" / "1" / "model.onnx", 8, 0.1) > 0


def test_level_result_without_statistics_has_no_mean_batch() -> None:
    result = LevelResult("m", "closed", 1, 1, 1.0, [0.001, 0.002])
    assert result.mean_batch is None and result.throughput == 2.0


def test_the_noop_server_answers_fixed_bytes_without_parsing() -> None:
    from loadtests.noop_server import METHOD, noop_process
    from tests.support.gateway import free_port

    answer = pb.ModelInferResponse(model_name="x", id="fixed").SerializeToString()
    with noop_process(free_port(), answer) as target, grpc.insecure_channel(target) as channel:
        call = channel.unary_unary(METHOD, None, None)
        # Not even a valid request is needed: nothing is parsed.
        assert call(b"\xff\xfe not protobuf", timeout=10) == answer
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelInfer(pb.ModelInferRequest(model_name="m"), timeout=10).id == "fixed"


def test_the_command_line_writes_levels_with_every_percentile(tmp_path: Path) -> None:
    from loadtests import benchmark

    out = tmp_path / "levels.json"
    assert benchmark.main(["--models", "digits", "--concurrency", "2", "--duration", "0.2",
                           "--warmup", "0.1", "--ceiling-rows", "1", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [level["model"] for level in data["levels"]] == ["digits", "no-op server"]
    for level in data["levels"]:
        assert level["requests"] > 0 and level["errors"] == {} and level["p99.9_ms"] > 0
    assert data["ceiling_rows_per_s"]["digits"]["1"] > 0


def test_the_command_line_streams_with_messages_in_flight(tmp_path: Path) -> None:
    from loadtests import benchmark

    out = tmp_path / "streams.json"
    assert benchmark.main(["--models", "digits", "--concurrency", "2", "--stream", "4",
                           "--duration", "0.3", "--warmup", "0.1", "--ceiling-rows", "1",
                           "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    levels = data["levels"]
    assert [(level["model"], level["mode"]) for level in levels] == [
        ("digits", "stream"), ("no-op server", "stream")]
    for level in levels:
        assert level["requests"] > 0 and level["errors"] == {} and level["p99.9_ms"] > 0
