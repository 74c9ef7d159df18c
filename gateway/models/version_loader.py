"""Loads one model version: builds its runtime, loads it and warms it up. A version becomes
READY only if both succeed; otherwise the failure is its UNAVAILABLE reason, logged."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from gateway.models.served import ServedVersion, VersionState
from gateway.observability.statistics import ModelStatistics
from model_store.errors import StoreError
from model_store.platforms import is_remote
from model_store.spec import ModelId, ModelSpec
from model_store.warmup import warmup_samples
from runtimes.base import InferRequest, Runtime

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class RuntimeStack:
    """A version's runtime as the factory wrapped it, with its statistics by reference."""

    runtime: Runtime
    statistics: ModelStatistics | None = None


# A factory may return the bare runtime or a stack that also names its statistics.
RuntimeFactory = Callable[[ModelId, ModelSpec, Path], Runtime | RuntimeStack]

# Loading many models at once on a small machine only makes every one of them slow.
LOAD_CONCURRENCY: Final = 4


class VersionLoader:
    """Loads versions, a few at a time; counts failures per model for metrics."""

    def __init__(self, factory: RuntimeFactory, concurrency: int = LOAD_CONCURRENCY) -> None:
        self._factory = factory
        self._gate = asyncio.Semaphore(concurrency)
        self.failures: collections.Counter[str] = collections.Counter()

    async def load(self, version: ServedVersion) -> None:
        """Load and warm up ``version`` (from ``version.source``), setting its state."""
        source = version.source
        if source is None:
            self._fail(version, "load failed: no model file", None)
            return
        async with self._gate:
            try:
                made = self._factory(version.id, version.spec, source)
                stack = made if isinstance(made, RuntimeStack) else RuntimeStack(made)
                runtime = stack.runtime
                await runtime.load()
            except Exception as exc:  # any failure to load keeps the version off traffic
                self._fail(version, f"load failed: {exc}", exc)
                return
            try:
                await _warm_up(runtime, version.spec, source.parent.parent)
            except Exception as exc:
                self._fail(version, f"warm-up failed: {exc}", exc)
                await unload_quietly(runtime)
                return
        version.runtime = runtime
        version.statistics = stack.statistics
        version.state = VersionState.READY
        log.info("model %s is loaded, warmed up and ready", version.id)

    def _fail(self, version: ServedVersion, reason: str, exc: Exception | None) -> None:
        self.failures[version.id.name] += 1
        version.state = VersionState.UNAVAILABLE
        version.reason = reason
        # Our own errors carry the whole story; anything else gets its traceback logged.
        expected = exc is None or isinstance(exc, StoreError) or type(exc).__module__.startswith(
            ("runtimes", "gateway", "model_store")
        )
        log.error("model %s never takes traffic: %s", version.id, reason,
                  exc_info=None if expected else exc)


async def _warm_up(runtime: Runtime, spec: ModelSpec, model_folder: Path) -> None:
    if is_remote(spec.platform, spec.backend):
        return  # the upstream Triton warms its own models; it may not be up yet
    samples = await asyncio.to_thread(warmup_samples, spec, model_folder)
    for sample in samples:
        for _ in range(sample.count):
            await runtime.infer(
                InferRequest(inputs=sample.inputs, rows=sample.rows, warmup=sample.name)
            )


async def unload_quietly(runtime: Runtime) -> None:
    """Unload; a failure is logged, never raised, so the others still drain."""
    try:
        await runtime.unload()
    except Exception:
        log.exception("unloading %s failed", runtime.model)
