"""End-to-end dynamic batching: the real gateway on loopback, called concurrently with
tritonclient and our own stubs; batch counts are read back through ModelStatistics."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc

from gateway.batching.batcher import DynamicBatcher
from modelgate_pb import grpc_service_pb2 as pb
from modelgate_pb import grpc_service_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

# One batch forms only when 4 requests wait (the preferred size); the long delay keeps a
# lone request queued for as long as a test needs it there.
GATHER4 = (
    "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 30000000 }\n"
)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching-store")
    for name, model in (("digits", "digits"), ("digits_unbatched", "digits_unbatched")):
        demo = Path(__file__).resolve().parents[3] / "gateway" / "demo_store" / model
        models.write_model(
            root,
            name,
            1,
            (demo / "1" / "model.onnx").read_bytes(),
            (demo / "config.pbtxt").read_text(encoding="utf-8"),
        )
    models.write_model(
        root,
        "gather4",
        1,
        models.add_constant(1.0),
        models.add_model_config("gather4", max_batch_size=4, extra=GATHER4),
    )
    return root


@pytest.fixture(scope="module")
def gateway(store: Path) -> Iterator[RunningGateway]:
    with running_gateway(store) as gw:
        yield gw


def batcher_of(gateway: RunningGateway, name: str) -> DynamicBatcher:
    runtime: object = gateway.gateway.manager.version(name, "1").runtime
    while runtime is not None and not isinstance(runtime, DynamicBatcher):
        runtime = getattr(runtime, "inner", None)
    assert isinstance(runtime, DynamicBatcher)
    return runtime


def stats(client: tc.InferenceServerClient, name: str) -> dict[str, object]:
    result = client.get_inference_statistics(name, "1", as_json=True)
    (model,) = result["model_stats"]
    return dict(model)


def count(stat: dict[str, object], *path: str) -> int:
    value: object = stat
    for key in path:
        assert isinstance(value, dict)
        value = value.get(key, 0)
    return int(str(value))

def digits_input(row: int) -> tc.InferInput:
    pixels = np.random.default_rng(row).uniform(0, 16, size=(1, 64)).astype(np.float32)
    tensor = tc.InferInput("pixels", [1, 64], "FP32")
    tensor.set_data_from_numpy(pixels)
    return tensor


def test_concurrent_requests_share_batches_with_unbatched_answers(
    client: tc.InferenceServerClient,
) -> None:
    rows = 96

    def call(model: str, row: int) -> tuple[np.ndarray, np.ndarray]:
        result = client.infer(model, [digits_input(row)])
        return result.as_numpy("label"), result.as_numpy("probabilities")

    with ThreadPoolExecutor(32) as pool:
        batched = list(pool.map(lambda r: call("digits", r), range(rows)))
    expected = [call("digits_unbatched", r) for r in range(rows)]
    for (label, probs), (want_label, want_probs) in zip(batched, expected, strict=True):
        np.testing.assert_array_equal(label, want_label)
        np.testing.assert_allclose(probs, want_probs, rtol=1e-5, atol=1e-6)

    got = stats(client, "digits")
    assert count(got, "inference_count") == rows
    assert count(got, "inference_stats", "success", "count") == rows
    assert 1 <= count(got, "execution_count") < rows
    batch_stats = got["batch_stats"]
    assert isinstance(batch_stats, list)
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in batch_stats}
    assert sum(size * n for size, n in sizes.items()) == rows
    assert max(sizes) > 1
    unbatched = stats(client, "digits_unbatched")
    assert count(unbatched, "execution_count") == count(unbatched, "inference_count") == rows


def test_requested_outputs_differ_per_request_inside_one_batch(
    client: tc.InferenceServerClient,
) -> None:
    before = count(stats(client, "gather4"), "execution_count")
    asks: list[tuple[str, ...]] = [("y",), ("doubled",), ("y", "doubled"), ()]

    def call(index: int) -> dict[str, np.ndarray]:
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.full((1, 4), float(index), dtype=np.float32))
        outputs = [tc.InferRequestedOutput(n) for n in asks[index]] or None
        result = client.infer("gather4", [x], outputs=outputs)
        names = [o.name for o in result.get_response().outputs]
        return {n: result.as_numpy(n) for n in names}

    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(call, range(4)))
    got = stats(client, "gather4")
    assert count(got, "execution_count") == before + 1
    for index, result in enumerate(results):
        assert set(result) == (set(asks[index]) or {"y", "doubled"})
        if "y" in result:
            np.testing.assert_array_equal(result["y"], np.full((1, 4), index + 1.0))
        if "doubled" in result:
            np.testing.assert_array_equal(result["doubled"], np.full((1, 4), index * 2.0))


def _gather4(stub: pb_grpc.GRPCInferenceServiceStub, value: float) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="gather4")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, dtype=np.float32).tobytes())
    return request


def _run_four(stub: pb_grpc.GRPCInferenceServiceStub) -> list[float]:
    with ThreadPoolExecutor(4) as pool:
        replies = list(
            pool.map(
                lambda v: stub.ModelInfer(_gather4(stub, v), timeout=30), (10.0, 11.0, 12.0, 13.0)
            )
        )
    return [float(np.frombuffer(r.raw_output_contents[0], dtype=np.float32)[0]) for r in replies]


def test_deadline_expired_and_cancelled_requests_never_run(
    gateway: RunningGateway, client: tc.InferenceServerClient
) -> None:
    batcher = batcher_of(gateway, "gather4")
    start = stats(client, "gather4")
    stub = gateway.stub()

    # Alone it waits for three more requests: its 0.3 s deadline passes in the queue.
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(_gather4(stub, 99.0), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: batcher.pending() == 0)

    # A caller that goes away leaves the queue at once.
    call = stub.ModelInfer.future(_gather4(stub, 77.0), timeout=30)
    wait_until(lambda: batcher.pending() == 1)
    call.cancel()
    wait_until(lambda: batcher.pending() == 0)

    # The next four form one batch of exactly themselves: neither of the two ran.
    assert _run_four(stub) == [11.0, 12.0, 13.0, 14.0]
    end = stats(client, "gather4")
    assert count(end, "execution_count") == count(start, "execution_count") + 1
    assert count(end, "inference_count") == count(start, "inference_count") + 4
    wait_until(
        lambda: (
            count(stats(client, "gather4"), "inference_stats", "fail", "count")
            == count(start, "inference_stats", "fail", "count") + 2
        )
    )


def test_full_queue_answers_resource_exhausted_with_retry_hint(tmp_path: Path) -> None:
    config = models.add_model_config(
        "tiny_queue",
        max_batch_size=4,
        extra="dynamic_batching { preferred_batch_size: [ 4 ] "
        "max_queue_delay_microseconds: 30000000 "
        "default_queue_policy { max_queue_size: 1 } }\n",
    )
    models.write_model(tmp_path, "tiny_queue", 1, models.add_constant(1.0), config)
    with running_gateway(tmp_path) as gw:
        stub = gw.stub()
        request = _gather4(stub, 1.0)
        request.model_name = "tiny_queue"
        waiting = stub.ModelInfer.future(request, timeout=30)
        wait_until(lambda: batcher_of(gw, "tiny_queue").pending() == 1)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(request, timeout=30)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        trailers = {m.key: m.value for m in info.value.trailing_metadata() or ()}
        assert int(trailers["retry-after-ms"]) >= 1
        waiting.cancel()


def test_priority_outside_levels_is_invalid_argument(tmp_path: Path) -> None:
    config = models.add_model_config(
        "prio",
        max_batch_size=4,
        extra="dynamic_batching { priority_levels: 2 default_priority_level: 2 }\n",
    )
    models.write_model(tmp_path, "prio", 1, models.add_constant(1.0), config)
    with running_gateway(tmp_path) as gw, tc.InferenceServerClient(gw.target) as c:
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        assert c.infer("prio", [x], priority=1).as_numpy("y").tolist() == [[1.0] * 4]
        with pytest.raises(tc.InferenceServerException) as info:
            c.infer("prio", [x], priority=3)
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT"


def test_queue_timeout_from_the_request_parameter_rejects(tmp_path: Path) -> None:
    config = models.add_model_config(
        "slowq",
        max_batch_size=4,
        extra="dynamic_batching { preferred_batch_size: [ 4 ] "
        "max_queue_delay_microseconds: 30000000 "
        "default_queue_policy { default_timeout_microseconds: 20000000 "
        "allow_timeout_override: true timeout_action: REJECT } }\n",
    )
    models.write_model(tmp_path, "slowq", 1, models.add_constant(1.0), config)
    with running_gateway(tmp_path) as gw, tc.InferenceServerClient(gw.target) as c:
        x = tc.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.zeros((1, 4), dtype=np.float32))
        # Alone, it would wait 30 s for company; its own 0.1 s queue timeout ends that.
        with pytest.raises(tc.InferenceServerException) as info:
            c.infer("slowq", [x], timeout=100_000, client_timeout=20)
        assert info.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "timeout expired" in str(info.value.message())
        (entry,) = c.get_inference_statistics("slowq", "1").model_stats
        assert entry.execution_count == 0 and entry.inference_stats.fail.count == 1
