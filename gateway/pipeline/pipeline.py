"""The transport-free inference pipeline: a decoded request plus its caller context in,
output tensors (or a domain error) out. Every adapter (gRPC unary, streaming, HTTP) calls it.

Steps, each a call to the module that owns it, each visited once: visibility, version
resolution and lease (models.registry, which asks models.resolver), the request against the
version's spec (pipeline.tensors), priority and deadline from the context, quota admission,
run, shadow mirror (models.shadow), classification of the outputs that asked for it,
post-inference hooks, release."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from gateway.errors import QuotaExceededError
from gateway.models.registry import ModelRegistry
from gateway.models.served import ServedVersion
from gateway.observability.observe import stage
from gateway.pipeline.classification import check_classes, classify
from gateway.pipeline.tensors import LayoutChecks
from gateway.quota.store import Admission, LocalQuotaStore, QuotaStore, Scope
from gateway.request.context import RequestContext
from gateway.request.decoded import DecodedRequest
from gateway.request.inference import Inference
from gateway.request.observation import QUOTA
from runtimes.base import InferRequest

log = logging.getLogger(__name__)


# A post-inference hook sees every successful inference; it must not block (sample, queue,
# return) and its failures are logged, never answered to the caller.
Hook = Callable[[RequestContext, Inference[ServedVersion]], None]


class InferencePipeline:
    """Runs one inference for any transport. Raises the domain errors of gateway/errors.py
    (and runtimes'/model_store's), which each adapter maps through gateway/status.py."""

    __slots__ = ("_checks", "_hooks", "_manager", "_quota", "_shadow")

    def __init__(
        self, manager: ModelRegistry, quota: QuotaStore | None = None,
        hooks: Sequence[Hook] = (),
    ) -> None:
        self._manager = manager
        self._shadow = manager.shadow
        self._quota = quota or LocalQuotaStore()
        self._hooks = tuple(hooks)
        self._checks = LayoutChecks()

    @property
    def quota(self) -> QuotaStore:
        """The store requests are charged to; a transport charges its open streams there."""
        return self._quota

    async def infer(
        self, context: RequestContext, model: str, version: str, decoded: DecodedRequest
    ) -> Inference[ServedVersion]:
        """Resolve and lease ``model``/``version`` for the context's tenant, check the
        decoded request against the chosen version's spec, admit it against the tenant's
        quotas, run it and mirror it to the model's shadow."""
        tenant = context.tenant
        # The lease keeps a replaced version from unloading under this request.
        lease = self._manager.lease(tenant, model, version, context.label,
                                    context.routing_key)
        try:
            served = lease.version
            observation = context.observation
            if observation is not None:
                observation.model = served.id  # labels metrics, spans and the access log
            request = self._checks.check(served, decoded)
            options = decoded.options
            if options is not None and options.classes:
                check_classes(served.spec, options.classes)
            request.context = context
            self._schedule(context, served, request)
            scopes = tenant.scopes(model)
            if scopes:
                # Charged before queueing; refunded if rejected before it ran.
                with await self._admit(context, scopes, request.rows):
                    outputs = await lease.runtime.infer(request)
            else:
                outputs = await lease.runtime.infer(request)
            inference = Inference(served, request, outputs, options)
            self._shadow.offer(lease, request, outputs, observation)
        finally:
            lease.release()
        for hook in self._hooks:
            try:
                hook(context, inference)
            except Exception:
                log.exception("post-inference hook %r failed", hook)
        if options is not None and options.classes:
            # After the hooks, which (like the shadow) see what the model answered.
            inference.outputs = classify(inference.version.spec, outputs, options.classes)
        return inference

    @staticmethod
    def _schedule(context: RequestContext, served: ServedVersion, request: InferRequest) -> None:
        """Priority (the request's, else the context's, else the tenant's level), deadline,
        queue timeout and trace headers from the caller's context."""
        if not request.priority:
            request.priority = context.priority
            if not request.priority:  # none asked: the tenant's level
                batching = served.spec.dynamic_batching
                if batching is not None and batching.priority_levels:
                    request.priority = context.tenant.priority_for(batching.priority_levels)
        if context.deadline is not None:
            request.deadline = context.deadline
        if request.timeout_us is None and context.timeout_us is not None:
            request.timeout_us = context.timeout_us
        if context.trace_headers:  # for remote runtimes (Triton) to send upstream
            request.trace_headers = context.trace_headers

    async def _admit(
        self, context: RequestContext, scopes: Sequence[Scope], rows: int
    ) -> Admission:
        """Charge the request to its scopes, inside a 'quota' span when it is traced; a
        rejection is recorded for the metrics (the edge counts quota rejections)."""
        observation = context.observation
        try:
            with stage(observation, "quota"):
                return await self._quota.admission(scopes, rows)
        except QuotaExceededError:
            if observation is not None:
                observation.rejected_by = QUOTA
            raise
