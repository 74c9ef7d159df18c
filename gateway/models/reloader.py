"""Polls the model store and hands settled changes to the manager. A model folder is acted
on only when its fingerprint is unchanged across two consecutive polls, so a version folder
still being written is never loaded half-written."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path

from gateway.models.manager import ModelManager
from model_store.snapshot import Fingerprint, store_fingerprints

log = logging.getLogger(__name__)


class Reloader:
    """Every ``interval`` seconds: fingerprint each model folder (file names, sizes and
    modification times, recursively); a model whose fingerprint differs from the one last
    applied and equals the previous poll's is reconciled. A folder that keeps changing
    waits until it stays quiet for one interval."""

    def __init__(self, manager: ModelManager, root: Path, interval: float) -> None:
        self._manager = manager
        self._root = root
        self._interval = interval
        self._previous: dict[str, Fingerprint] = {}
        self._applied: dict[str, Fingerprint] = {}
        self._task: asyncio.Task[None] | None = None

    async def snapshot(self) -> None:
        """Record the store as already applied (call before the manager's first load: a
        change made during that load then differs and is picked up)."""
        prints = await asyncio.to_thread(store_fingerprints, self._root)
        self._previous = dict(prints)
        self._applied = dict(prints)

    def start(self) -> None:
        """Poll in the background until ``stop``."""
        self._task = asyncio.get_running_loop().create_task(self._run(), name="store-poll")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def poll_once(self) -> set[str]:
        """One poll: reconcile the models whose settled fingerprint changed; returns them."""
        current = await asyncio.to_thread(store_fingerprints, self._root)
        settled = {
            name for name in set(current) | set(self._previous)
            if current.get(name) == self._previous.get(name)
        }
        changed = {name for name in settled if current.get(name) != self._applied.get(name)}
        pending = {name for name in set(current) | set(self._previous) if name not in settled}
        if pending:
            log.debug("store poll: %s still changing; waiting for them to settle",
                      ", ".join(sorted(pending)))
        self._previous = current
        if changed:
            log.info("store poll: reconciling %s", ", ".join(sorted(changed)))
            await self._manager.reconcile(changed)
            for name in changed:
                if name in current:
                    self._applied[name] = current[name]
                else:
                    self._applied.pop(name, None)
        return changed

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:  # a failed poll must not end polling
                log.exception("polling the model store failed")
