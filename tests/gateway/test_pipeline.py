"""The inference pipeline driven directly (no transport): a real ONNX model served by a
real ModelManager, tenants with pins, priorities and quotas, post-inference hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import ModelNotFoundError, QuotaExceededError, RequestTimeoutError
from gateway.models.backends import RuntimeFactory
from gateway.models.manager import ModelManager, ServedVersion
from gateway.pipeline.pipeline import Inference, InferencePipeline
from gateway.quota.store import Limits, LocalQuotaStore
from gateway.request.context import QUOTA, RequestContext, RequestRecord, context_of
from gateway.tenancy.tenants import ANONYMOUS, ModelGrant, Tenant
from model_store.repository import ModelRepository
from runtimes.base import InferRequest
from runtimes.onnx_runtime import OnnxOptions
from tests.support import models

BATCHED = ('dynamic_batching { priority_levels: 3 default_priority_level: 2 }\n'
           'version_policy: { all: {} }')


@pytest.fixture
async def manager(tmp_path: Path) -> AsyncIterator[ModelManager]:
    for version, value in ((1, 1.0), (2, 2.0)):
        models.write_model(tmp_path, "add", version, models.add_constant(value),
                           models.add_model_config("add", extra=BATCHED))
    served = ModelManager(ModelRepository(tmp_path), RuntimeFactory(OnnxOptions()))
    await served.start()
    try:
        yield served
    finally:
        await served.stop()


def decoder(rows: int = 1, seen: list[ServedVersion] | None = None, **hints: object):  # type: ignore[no-untyped-def]
    def decode(version: ServedVersion) -> InferRequest:
        if seen is not None:
            seen.append(version)
        x = np.ones((rows, 4), np.float32)
        return InferRequest(inputs={"x": x}, rows=rows, **hints)  # type: ignore[arg-type]

    return decode


async def test_runs_the_resolved_version_and_returns_what_ran(manager: ModelManager) -> None:
    seen: list[ServedVersion] = []
    context = RequestContext(ANONYMOUS, trace_headers={"traceparent": "00-" + "1" * 32
                                                       + "-" + "2" * 16 + "-01"})
    inference = await InferencePipeline(manager).infer(context, "add", "", decoder(2, seen))
    assert inference.version.id.version == 2 and seen == [inference.version]
    np.testing.assert_array_equal(inference.outputs["y"], np.full((2, 4), 3.0, np.float32))
    assert context_of(inference.request) is context
    assert inference.request.trace_headers == context.trace_headers
    assert inference.version.inflight == 0  # the lease was released


async def test_a_pinned_tenant_runs_its_pin_and_an_unseen_model_is_not_found(
    manager: ModelManager,
) -> None:
    pipeline = InferencePipeline(manager)
    pinned = Tenant(id="p", models=(ModelGrant("add", "1"),))
    inference = await pipeline.infer(RequestContext(pinned), "add", "", decoder())
    assert inference.version.id.version == 1
    seen: list[ServedVersion] = []
    stranger = Tenant(id="s", models=(ModelGrant("other"),))
    with pytest.raises(ModelNotFoundError, match="unknown model 'add'"):
        await pipeline.infer(RequestContext(stranger), "add", "", decoder(seen=seen))
    assert seen == []  # refused before anything was decoded


async def test_priority_deadline_and_timeout_come_from_the_context(
    manager: ModelManager,
) -> None:
    pipeline = InferencePipeline(manager)
    low = Tenant(id="low", priority=3, models=(ModelGrant("*"),))
    deadline = time.monotonic() + 30
    inference = await pipeline.infer(
        RequestContext(low, deadline=deadline, timeout_us=5_000_000), "add", "1", decoder()
    )
    request = inference.request
    assert (request.priority, request.deadline, request.timeout_us) == (3, deadline, 5_000_000)
    # The request's own priority wins over the context's, the context's over the tenant's.
    asked = await pipeline.infer(RequestContext(low, priority=2), "add", "1",
                                 decoder(priority=1))
    assert asked.request.priority == 1
    context_only = await pipeline.infer(RequestContext(low, priority=2), "add", "1", decoder())
    assert context_only.request.priority == 2


async def test_quota_is_charged_before_queueing_and_refunded_when_rejected_before_running(
    manager: ModelManager,
) -> None:
    pipeline = InferencePipeline(manager, LocalQuotaStore())
    tenant = Tenant(id="q", models=(ModelGrant("*"),),
                    limits=Limits(requests_per_s=0.001, burst=1))
    record = RequestRecord(method="ModelInfer", start=0.0)
    # A deadline already passed: the batcher refuses it before it runs; the token comes back.
    with pytest.raises(RequestTimeoutError):
        await pipeline.infer(RequestContext(tenant, deadline=time.monotonic() - 1, record=record),
                             "add", "", decoder())
    assert record.rejected_by is None
    await pipeline.infer(RequestContext(tenant), "add", "", decoder())  # the refunded token
    with pytest.raises(QuotaExceededError):
        await pipeline.infer(RequestContext(tenant, record=record), "add", "", decoder())
    assert record.rejected_by == QUOTA
    assert all(v.inflight == 0 for v in manager.model("add").versions.values())


async def test_hooks_see_every_inference_and_their_failures_stay_theirs(
    manager: ModelManager, caplog: pytest.LogCaptureFixture,
) -> None:
    seen: list[tuple[RequestContext, Inference]] = []

    def broken(context: RequestContext, inference: Inference) -> None:
        raise RuntimeError("hook bug")

    pipeline = InferencePipeline(manager, hooks=(broken, lambda c, i: seen.append((c, i))))
    context = RequestContext(ANONYMOUS, protocol="http")
    with caplog.at_level(logging.ERROR):
        inference = await pipeline.infer(context, "add", "", decoder())
    assert seen == [(context, inference)]
    assert "post-inference hook" in caplog.text and "hook bug" in caplog.text
