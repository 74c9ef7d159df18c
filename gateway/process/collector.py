"""The garbage collector's settings in a serving process: what start-up built is frozen out
of its scans, and its youngest generation is collected less often than Python's default."""

from __future__ import annotations

import gc
import logging
from typing import Final

log = logging.getLogger(__name__)

# Python collects its youngest generation every 700 net allocations of container objects:
# every few requests here, each collection scanning the young objects of every request in
# flight. Nearly all of a request's objects are freed by reference counting before any
# collection sees them, so scanning ten times less often finds the same garbage for a
# tenth of the work: at 32 callers on the batched MLP, 8.5 µs of the event loop per
# request went to collections at 700 and 1.5 µs at 10,000 (collection times summed by
# gc.callbacks over 20,000 requests). Cyclic garbage waits longer, by at most that many
# objects. The older generations keep Python's ratios.
YOUNG_THRESHOLD: Final = 10_000


def settle() -> None:
    """Once serving: collect what start-up left, freeze the survivors (modules, models,
    settings: they live as long as the process) so no full collection scans them again,
    and collect the youngest generation every YOUNG_THRESHOLD allocations."""
    gc.collect()
    gc.freeze()
    _, middle, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, middle, oldest)
    log.debug("garbage collector: %d objects frozen, thresholds %s", gc.get_freeze_count(),
              gc.get_threshold())
