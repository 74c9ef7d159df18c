"""ModelStatistics: the recorder under the batcher and without it, and the ModelStatistics
RPC as tritonclient's get_inference_statistics sees it on the real gateway."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
import tritonclient.http as tch

from gateway.batching.batcher import DynamicBatcher
from gateway.models.backends import with_scheduling
from gateway.observability.statistics import ModelStatistics, StatisticsRuntime
from model_store.datatypes import DataType
from model_store.spec import DynamicBatchingSpec, ModelId, ModelSpec, TensorSpec
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from runtimes.base import InferRequest
from runtimes.errors import InferenceFailed
from tests.support import models
from tests.support.fake_runtime import FakeClock, FakeRuntime
from tests.support.gateway import RunningGateway, running_gateway

pytestmark = pytest.mark.timeout(120)


def spec(batching: DynamicBatchingSpec | None) -> ModelSpec:
    return ModelSpec(
        name="m",
        platform="onnxruntime_onnx",
        backend="",
        max_batch_size=8,
        inputs=(TensorSpec("x", DataType.FP32, (2,)),),
        outputs=(TensorSpec("y", DataType.FP32, (2,)),),
        dynamic_batching=batching,
    )


def req(rows: int) -> InferRequest:
    return InferRequest(inputs={"x": np.ones((rows, 2), dtype=np.float32)}, rows=rows)


async def test_batched_counts_rows_batches_and_queue_per_request() -> None:
    clock = FakeClock()
    fake = FakeRuntime(spec(DynamicBatchingSpec(max_queue_delay_us=1000)))
    stats = ModelStatistics(fake.model, wall_clock=lambda: 1700000000.5)
    runtime = StatisticsRuntime(
        DynamicBatcher(fake, statistics=stats, clock=clock), stats, records_executions=False
    )
    tasks = [asyncio.create_task(runtime.infer(req(r))) for r in (1, 2, 1)]
    await asyncio.sleep(0)
    clock.advance(0.002)
    await asyncio.gather(*tasks)
    snap = stats.snapshot()
    assert (snap.inference_count, snap.execution_count) == (4, 1)
    assert snap.success.count == 3 and snap.fail.count == 0
    assert snap.queue.count == snap.compute_infer.count == 3
    # Each waited until the queue delay (1 ms) ran out and the batch was sent.
    assert snap.queue.ns == 3 * 1_000_000
    assert list(snap.batches) == [4] and snap.batches[4].compute_infer.count == 1
    assert snap.last_inference_ms == 1700000000500
    assert runtime.statistics is stats


async def test_failed_batch_counts_failures_not_executions() -> None:
    fake = FakeRuntime(spec(DynamicBatchingSpec()))
    stats = ModelStatistics(fake.model)
    runtime = StatisticsRuntime(
        DynamicBatcher(fake, statistics=stats, clock=FakeClock()),
        stats,
        records_executions=False,
    )
    fake.fail_next = InferenceFailed("boom")
    with pytest.raises(InferenceFailed):
        await runtime.infer(req(1))
    snap = stats.snapshot()
    assert (snap.fail.count, snap.success.count, snap.execution_count) == (1, 0, 0)


async def test_unbatched_requests_are_one_execution_each() -> None:
    fake = FakeRuntime(spec(None))
    runtime = with_scheduling(fake)
    assert not isinstance(getattr(runtime, "inner", None), DynamicBatcher)
    stats = runtime.statistics
    assert stats is not None
    await runtime.infer(req(3))
    await runtime.infer(req(1))
    snap = stats.snapshot()
    assert (snap.inference_count, snap.execution_count, snap.success.count) == (4, 2, 2)
    assert sorted(snap.batches) == [1, 3]
    assert snap.model == ModelId("m", 1)


# ---- the RPC on the real gateway ------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root: Path = tmp_path_factory.mktemp("stats-store")
    policy = "version_policy: { all: {} }\n"
    models.write_model(
        root, "plain", 1, models.add_constant(1.0), models.add_model_config("plain", extra=policy)
    )
    models.write_model(root, "plain", 2, models.add_constant(2.0), None)
    models.write_model(
        root,
        "batched",
        1,
        models.add_constant(1.0),
        models.add_model_config(
            "batched", extra="dynamic_batching { max_queue_delay_microseconds: 100 }\n"
        ),
    )
    models.write_model(root, "solo", 1, models.add_constant(1.0),
                       models.add_model_config("solo"))
    with running_gateway(root, http_port=0) as gw:
        yield gw


def test_get_inference_statistics_through_tritonclient(gateway: RunningGateway) -> None:
    with tc.InferenceServerClient(gateway.target) as client:
        x = tc.InferInput("x", [2, 4], "FP32")
        x.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
        for _ in range(3):
            client.infer("plain", [x], model_version="2")
        client.infer("batched", [x])
        bad = tc.InferInput("x", [2, 5], "FP32")
        bad.set_data_from_numpy(np.zeros((2, 5), dtype=np.float32))
        with pytest.raises(tc.InferenceServerException):
            client.infer("plain", [bad], model_version="2")

        one = client.get_inference_statistics("plain", "2")
        (entry,) = one.model_stats
        assert (entry.name, entry.version) == ("plain", "2")
        assert entry.inference_count == 6 and entry.execution_count == 3
        assert entry.inference_stats.success.count == 3
        assert entry.inference_stats.success.ns > 0
        assert entry.inference_stats.compute_infer.count == 3
        assert [(b.batch_size, b.compute_infer.count) for b in entry.batch_stats] == [(2, 3)]
        assert entry.last_inference > 1_600_000_000_000

        versions = client.get_inference_statistics("plain", as_json=True)["model_stats"]
        assert sorted(v["version"] for v in versions) == ["1", "2"]
        every = client.get_inference_statistics(as_json=True)["model_stats"]
        assert {(v["name"], v["version"]) for v in every} == {
            ("plain", "1"),
            ("plain", "2"),
            ("batched", "1"),
            ("solo", "1"),
        }
        batched = client.get_inference_statistics("batched", "1").model_stats[0]
        assert batched.execution_count == 1 and batched.inference_count == 2

        with pytest.raises(tc.InferenceServerException) as info:
            client.get_inference_statistics("nope")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(tc.InferenceServerException) as info:
            client.get_inference_statistics("plain", "9")
        assert info.value.status() == "StatusCode.NOT_FOUND"
        extensions = client.get_server_metadata().extensions
        assert "statistics" in extensions and "schedule_policy" in extensions


def _infer_request(model: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[2, 4])
    request.raw_input_contents.append(np.zeros((2, 4), dtype=np.float32).tobytes())
    return request


def test_a_model_without_batcher_reports_tritons_breakdown(gateway: RunningGateway) -> None:
    """Queue (entering the runtime stack to the run), input (arrival at the edge to the
    stack: decode, checks), infer (the run) and output (the run's end to the encoded
    answer) each count every successful request, and add up to its success duration; the
    same figures over gRPC and REST."""
    x = tc.InferInput("x", [2, 4], "FP32")
    x.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
    with tc.InferenceServerClient(gateway.target) as client:
        for _ in range(2):
            client.infer("solo", [x])
        with grpc.insecure_channel(gateway.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            (streamed,) = stub.ModelStreamInfer(iter([_infer_request("solo")]), timeout=30)
            assert not streamed.error_message
        rest = f"127.0.0.1:{gateway.gateway.rest_port}"
        with tch.InferenceServerClient(rest) as http_client:
            hx = tch.InferInput("x", [2, 4], "FP32")
            hx.set_data_from_numpy(np.zeros((2, 4), dtype=np.float32))
            http_client.infer("solo", [hx])
            over_rest = http_client.get_inference_statistics("solo", "1")["model_stats"][0]
        stats = client.get_inference_statistics("solo", "1").model_stats[0].inference_stats
        batched = client.get_inference_statistics("batched", "1").model_stats[0]

    parts = (stats.queue, stats.compute_input, stats.compute_infer, stats.compute_output)
    assert [p.count for p in parts] == [4, 4, 4, 4] and stats.success.count == 4
    assert stats.compute_input.ns > 0 and stats.compute_output.ns > 0
    assert stats.success.ns == sum(p.ns for p in parts)
    assert stats.compute_infer.ns < stats.success.ns
    rest_stats = over_rest["inference_stats"]
    for name, part in (("success", stats.success), ("queue", stats.queue),
                       ("compute_input", stats.compute_input),
                       ("compute_infer", stats.compute_infer),
                       ("compute_output", stats.compute_output)):
        assert (int(rest_stats[name]["count"]), int(rest_stats[name]["ns"])) == (
            part.count, part.ns), name
    (per_size,) = over_rest["batch_stats"]
    assert int(per_size["batch_size"]) == 2
    assert int(per_size["compute_input"]["count"]) == 4

    # A batched model's breakdown is the batcher's (queue to dispatch, merge, run, split)
    # plus the same arrival and encoding: never more than its success duration.
    b = batched.inference_stats
    assert b.compute_input.ns > 0 and b.compute_output.ns > 0
    assert b.queue.ns + b.compute_input.ns + b.compute_infer.ns + b.compute_output.ns \
        <= b.success.ns
