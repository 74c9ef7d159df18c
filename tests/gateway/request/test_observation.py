"""One Observation per request, carried through the batcher: a real ONNX model behind the
observed runtime stack (RequestObserver → statistics → DynamicBatcher → ExecutionObserver),
driven through the pipeline, with the version's figures read back from the Prometheus
registry."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.models.backends import RuntimeFactory
from gateway.models.manager import ModelManager
from gateway.observability.metrics import Metrics
from gateway.pipeline.pipeline import InferencePipeline
from gateway.request.context import RequestContext
from gateway.request.decoded import DecodedRequest, InputLayout, RequestLayout
from gateway.request.observation import Observation
from gateway.tenancy.tenants import ANONYMOUS
from model_store.datatypes import DataType
from model_store.repository import ModelRepository
from runtimes.base import InferRequest
from runtimes.onnx_runtime import OnnxOptions
from tests.support import models

# Three requests make the preferred batch: the batcher sends them together at once, and a
# long delay keeps it from sending fewer.
BATCHED = ("dynamic_batching { preferred_batch_size: [3] "
           "max_queue_delay_microseconds: 5000000 }")
LABELS = {"model": "add", "version": "1"}


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[tuple[ModelManager, Metrics]]:
    models.write_model(tmp_path, "add", 1, models.add_constant(1.0),
                       models.add_model_config("add", extra=BATCHED))
    metrics = Metrics(process_metrics=False)
    manager = ModelManager(ModelRepository(tmp_path), RuntimeFactory(OnnxOptions(), metrics))
    await manager.start()
    try:
        yield manager, metrics
    finally:
        await manager.stop()


def _decoded() -> DecodedRequest:
    x = np.ones((1, 4), np.float32)
    layout: tuple[InputLayout, ...] = (("x", DataType.FP32, (1, 4)),)
    return DecodedRequest(InferRequest(inputs={"x": x}), RequestLayout(layout, ()))


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name, LABELS)
    assert value is not None, name
    return value


async def test_each_member_of_a_batch_gets_its_figures_on_its_own_observation(
    served: tuple[ModelManager, Metrics],
) -> None:
    manager, metrics = served
    pipeline = InferencePipeline(manager)
    observations = [Observation("ModelInfer", time.perf_counter()) for _ in range(3)]
    inferences = await asyncio.gather(*(
        pipeline.infer(RequestContext(ANONYMOUS, observation=o), "add", "", _decoded())
        for o in observations))
    assert [i.outputs["y"].tolist() for i in inferences] == [[[2.0] * 4]] * 3
    for observation in observations:
        assert observation.model is not None and observation.model.version == 1
        assert (observation.rows, observation.batch_rows) == (1, 3)
        assert observation.queue_s is not None and observation.queue_s >= 0
        assert observation.compute_s is not None and observation.compute_s > 0
        assert observation.dispatched is not None
        assert observation.dispatched >= observation.enqueued
    # The batch's three members are one execution of three rows, and three requests in
    # the queue and compute histograms, observed at the batch's end.
    assert _sample(metrics, "modelgate_inference_exec_count_total") == 1
    assert _sample(metrics, "modelgate_inference_count_total") == 3
    assert _sample(metrics, "modelgate_inference_queue_duration_seconds_count") == 3
    assert _sample(metrics, "modelgate_inference_compute_duration_seconds_count") == 3
    assert _sample(metrics, "modelgate_inference_queue_depth") == 0
    assert _sample(metrics, "modelgate_inference_in_flight") == 0


async def test_an_unobserved_request_is_measured_without_touching_its_callers_context(
    served: tuple[ModelManager, Metrics],
) -> None:
    manager, metrics = served
    pipeline = InferencePipeline(manager)
    contexts = [RequestContext(ANONYMOUS) for _ in range(3)]
    await asyncio.gather(*(pipeline.infer(c, "add", "", _decoded()) for c in contexts))
    # The version's observers gave each request an observation of its own (the caller's
    # context, possibly shared between requests, is left as it was).
    assert all(c.observation is None for c in contexts)
    assert _sample(metrics, "modelgate_inference_queue_duration_seconds_count") == 3
    assert _sample(metrics, "modelgate_inference_exec_count_total") == 1
    assert _sample(metrics, "modelgate_inference_queue_depth") == 0
