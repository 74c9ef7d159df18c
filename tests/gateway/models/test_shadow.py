"""Shadow traffic: a share of requests is mirrored to another version after the primary
answered; callers only ever see the primary, and the shadow's results are recorded."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as tc
from prometheus_client.parser import text_string_to_metric_families

from gateway.models.shadow import ShadowMirror, ShadowResult, ShadowStats, compare
from gateway.observability.tracing import TRACE_ID_KEY
from modelgate_pb import grpc_service_pb2 as pb
from tests.support import models
from tests.support.gateway import RunningGateway, running_gateway
from tests.support.otlp_receiver import OtlpReceiver
from tests.support.waiting import until

ALL_VERSIONS = "version_policy: { all {} }\n"


def test_compare_reports_max_abs_difference_and_label_agreement() -> None:
    a = {"y": np.array([[1.0, 2.0]], dtype=np.float32), "label": np.array([[3]])}
    assert compare(a, a) == (0.0, True)
    b = {"y": np.array([[1.0, 2.5]], dtype=np.float32), "label": np.array([[3]])}
    assert compare(a, b) == (0.5, False)
    c = {"y": a["y"], "label": np.array([[4]])}
    assert compare(a, c) == (0.0, False)  # floats agree, the class label does not
    assert compare(a, {"y": a["y"]})[1] is False  # an output missing from the shadow
    nan = {"y": np.array([[math.nan, 2.0]], dtype=np.float32), "label": a["label"]}
    assert compare(a, nan)[0] == math.inf


async def test_failures_are_recorded_and_never_raised() -> None:
    mirror = ShadowMirror()
    results: list[ShadowResult] = []
    recorded = asyncio.Event()

    def listen(result: ShadowResult) -> None:
        results.append(result)
        recorded.set()

    mirror.add_listener(listen)

    async def broken() -> dict[str, np.ndarray]:
        raise RuntimeError("shadow exploded")

    assert mirror.mirror("m", 1, 2, broken, {"y": np.zeros(1)})
    await recorded.wait()
    stats = mirror.stats()[("m", 1, 2)]
    assert (stats.mirrored, stats.errors) == (1, 1)
    assert "shadow exploded" in stats.last_error
    assert results[0].agreed is None


async def test_shadows_beyond_the_in_flight_bound_are_skipped() -> None:
    mirror = ShadowMirror(max_in_flight=1)
    gate: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def slow() -> dict[str, np.ndarray]:
        await gate
        return {"y": np.zeros(1)}

    assert mirror.mirror("m", 1, 2, slow, {"y": np.zeros(1)})
    assert not mirror.mirror("m", 1, 2, slow, {"y": np.zeros(1)})
    assert mirror.stats()[("m", 1, 2)].skipped == 1
    gate.set_result(None)
    await mirror.close()


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningGateway]:
    root = tmp_path_factory.mktemp("store")
    # "adder": version 1 answers, version 2 (adds 2, so disagrees by 1.0) shadows everything.
    # "twin": version 3 computes the same as version 1, so the shadow agrees.
    for name, versions in (("adder", {1: 1.0, 2: 2.0}), ("twin", {1: 1.0, 3: 1.0})):
        config = models.add_model_config(name, extra=ALL_VERSIONS)
        for version, constant in versions.items():
            models.write_model(root, name, version, models.add_constant(constant), config)
        shadow = max(versions)
        (root / name / "routing.toml").write_text(
            f"[labels]\nstable = 1\n[weights]\nstable = 1\n"
            f"[shadow]\ntarget = {shadow}\nfraction = 1.0\n",
            encoding="utf-8",
        )
    with running_gateway(root) as gw:
        yield gw


def call_many(gateway: RunningGateway, name: str, count: int) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    tensor = tc.InferInput("x", [2, 4], "FP32")
    tensor.set_data_from_numpy(x)
    with tc.InferenceServerClient(gateway.target) as client:
        for _ in range(count):
            result = client.infer(name, [tensor])
            # The caller always gets the primary's answer, never the shadow's.
            assert result.get_response().model_version == "1"
            np.testing.assert_array_equal(result.as_numpy("y"), x + 1)


def shadow_stats(gateway: RunningGateway, name: str, shadow: int, count: int) -> ShadowStats:
    mirror = gateway.gateway.manager.shadow

    def recorded() -> bool:
        stats = mirror.stats().get((name, 1, shadow))
        return stats is not None and stats.mirrored + stats.skipped >= count

    gateway.call(until(recorded, f"{count} shadow results for {name}"))
    return mirror.stats()[(name, 1, shadow)]


def test_disagreeing_shadow_is_recorded(gateway: RunningGateway) -> None:
    call_many(gateway, "adder", 20)
    stats = shadow_stats(gateway, "adder", 2, 20)
    assert stats.errors == 0 and stats.skipped == 0
    assert (stats.mirrored, stats.disagreed, stats.agreed) == (20, 20, 0)
    assert stats.max_abs_diff == pytest.approx(1.0)
    assert stats.latency_s_sum > 0
    text = gateway.gateway.metrics.exposition().decode()
    labels = {"model": "adder", "primary": "1", "shadow": "2"}
    assert sample(text, "modelgate_shadow_requests_total", outcome="disagreed", **labels) == 20
    assert sample(text, "modelgate_shadow_requests_total", outcome="error", **labels) == 0
    assert sample(text, "modelgate_shadow_latency_seconds_count", **labels) == 20
    assert sample(text, "modelgate_shadow_max_abs_diff", **labels) == 1.0


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample of a Prometheus exposition."""
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels}")


def test_agreeing_shadow_is_recorded(gateway: RunningGateway) -> None:
    call_many(gateway, "twin", 10)
    stats = shadow_stats(gateway, "twin", 3, 10)
    assert (stats.mirrored, stats.agreed, stats.disagreed, stats.errors) == (10, 10, 0, 0)
    assert stats.max_abs_diff == 0.0


def test_the_shadow_is_traced_as_a_child_of_the_request(tmp_path: Path) -> None:
    config = models.add_model_config("adder", extra=ALL_VERSIONS)
    for version in (1, 2):
        models.write_model(tmp_path, "adder", version, models.add_constant(float(version)),
                           config)
    (tmp_path / "adder" / "routing.toml").write_text(
        "[weights]\n'1' = 1\n[shadow]\ntarget = 2\nfraction = 1.0\n", encoding="utf-8"
    )
    request = pb.ModelInferRequest(model_name="adder")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.ones((1, 4), np.float32).tobytes())
    with OtlpReceiver() as receiver, running_gateway(
        tmp_path, otlp_endpoint=receiver.endpoint
    ) as gw:
        _, call = gw.stub().ModelInfer.with_call(request, timeout=30)
        trace_id = dict(call.trailing_metadata() or ())[TRACE_ID_KEY]
        shadow_stats(gw, "adder", 2, 1)
        assert gw.gateway.tracing is not None
        gw.gateway.tracing.force_flush()
        spans = receiver.wait_for(
            lambda found: any(s.name == "shadow" and s.trace_id == trace_id for s in found)
        )
    tree = {s.name: s for s in spans if s.trace_id == trace_id}
    shadow = tree["shadow"]
    assert shadow.parent_span_id == tree["inference.GRPCInferenceService/ModelInfer"].span_id
    assert shadow.attributes["modelgate.model.version"] == 2
    assert shadow.attributes["modelgate.shadow.primary_version"] == 1
    assert shadow.attributes["modelgate.shadow.agreed"] is False
    assert shadow.attributes["modelgate.shadow.max_abs_diff"] == 1.0
