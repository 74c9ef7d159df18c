"""The inference pipeline driven directly (no transport): a real ONNX model served by a
real ModelManager, tenants with pins, priorities and quotas, the spec check of a decoded
request (and its cache of checked layouts), post-inference hooks."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from gateway.errors import (
    InvalidRequestError,
    ModelNotFoundError,
    QuotaExceededError,
    RequestTimeoutError,
)
from gateway.models.backends import RuntimeFactory
from gateway.models.manager import ModelManager
from gateway.pipeline.pipeline import InferencePipeline
from gateway.pipeline.tensors import LayoutChecks
from gateway.quota.store import Limits, LocalQuotaStore
from gateway.request.context import RequestContext, context_of
from gateway.request.decoded import DecodedRequest, InputLayout, RequestLayout
from gateway.request.inference import Inference
from gateway.request.observation import QUOTA, Observation
from gateway.tenancy.tenants import ANONYMOUS, ModelGrant, Tenant
from model_store.datatypes import DataType
from model_store.errors import InputMismatchError
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


def decoder(rows: int = 1, shape: tuple[int, ...] | None = None,
            outputs: tuple[str, ...] = (), **hints: object) -> DecodedRequest:
    """What an adapter hands the pipeline for one FP32 input 'x' of ``rows`` rows."""
    x = np.ones((rows, 4), np.float32)
    layout: tuple[InputLayout, ...] = (("x", DataType.FP32, shape or (rows, 4)),)
    request = InferRequest(inputs={"x": x}, outputs=outputs, **hints)  # type: ignore[arg-type]
    return DecodedRequest(request, RequestLayout(layout, outputs))


async def test_runs_the_resolved_version_and_returns_what_ran(manager: ModelManager) -> None:
    context = RequestContext(ANONYMOUS, trace_headers={"traceparent": "00-" + "1" * 32
                                                       + "-" + "2" * 16 + "-01"})
    decoded = decoder(2)
    inference = await InferencePipeline(manager).infer(context, "add", "", decoded)
    # The request that ran is the decoded one, its rows set by the resolved version's check.
    assert inference.version.id.version == 2 and inference.request is decoded.request
    assert inference.request.rows == 2
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
    stranger = Tenant(id="s", models=(ModelGrant("other"),))
    refused = decoder()
    with pytest.raises(ModelNotFoundError, match="unknown model 'add'"):
        await pipeline.infer(RequestContext(stranger), "add", "", refused)
    assert refused.request.context is None  # refused before it was checked or ran


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
    record = Observation(method="ModelInfer", start=0.0)
    # A deadline already passed: the batcher refuses it before it runs; the token comes back.
    with pytest.raises(RequestTimeoutError):
        await pipeline.infer(
            RequestContext(tenant, deadline=time.monotonic() - 1, observation=record),
            "add", "", decoder())
    assert record.rejected_by is None
    await pipeline.infer(RequestContext(tenant), "add", "", decoder())  # the refunded token
    with pytest.raises(QuotaExceededError):
        await pipeline.infer(RequestContext(tenant, observation=record), "add", "", decoder())
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


async def test_the_decoded_request_is_checked_against_the_resolved_versions_spec(
    manager: ModelManager,
) -> None:
    pipeline = InferencePipeline(manager)
    context = RequestContext(ANONYMOUS)
    with pytest.raises(InputMismatchError, match=r"expected shape \[-1,4\], got \[1,5\]"):
        await pipeline.infer(context, "add", "", decoder(shape=(1, 5)))
    with pytest.raises(InputMismatchError, match="has no output 'nope'"):
        await pipeline.infer(context, "add", "", decoder(outputs=("nope",)))
    # What the adapter found wrong with the data is answered after the model's signature
    # check: the signature's message first for a layout it refuses, else the adapter's.
    wrong = decoder(shape=(1, 2**40))
    wrong.invalid = InvalidRequestError("input 'x': shape exceeds")
    with pytest.raises(InputMismatchError, match="dimension 1 must be 4"):
        await pipeline.infer(context, "add", "", wrong)
    short = decoder()
    short.invalid = InvalidRequestError("input 'x': needs 16 bytes, raw contents hold 15")
    for _ in range(2):  # unchecked, then from the layout cache
        with pytest.raises(InvalidRequestError, match="needs 16 bytes"):
            await pipeline.infer(context, "add", "", short)
        short.invalid = InvalidRequestError("input 'x': needs 16 bytes, raw contents hold 15")
    assert all(v.inflight == 0 for v in manager.model("add").versions.values())


async def test_checked_layouts_are_remembered_per_version_and_bounded(
    manager: ModelManager, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from gateway.pipeline import tensors

    monkeypatch.setattr(tensors, "MAX_LAYOUTS", 3)
    checks = LayoutChecks(limit=2)
    one, two = (manager.model("add").versions[n] for n in (1, 2))
    first = decoder(2)
    assert checks.check(one, first).rows == 2
    # The same layout on a later request: from the cache (the spec is not consulted).
    again = decoder(2)
    again.layout = first.layout
    assert checks.check(one, again).rows == 2
    assert checks._versions[one] == {first.layout: 2}
    # A refused layout is never remembered; a version's table holds at most MAX_LAYOUTS.
    with pytest.raises(InputMismatchError):
        checks.check(one, decoder(shape=(2, 3)))
    for rows in range(1, 8):
        assert checks.check(one, decoder(rows)).rows == rows
    assert 0 < len(checks._versions[one]) <= 3
    checks.check(two, decoder())
    assert set(checks._versions) == {one, two}
