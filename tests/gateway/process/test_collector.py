"""The serving process's collector settings: start-up's survivors frozen, the youngest
generation collected every YOUNG_THRESHOLD allocations, the older ratios kept."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from gateway.process import collector


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


class _Node:
    def __init__(self) -> None:
        self.me = self  # a cycle: only a collection frees it


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_lives_and_collects_the_young_less_often() -> None:
    _, middle, oldest = gc.get_threshold()
    survivor = {"kept": [1, 2, 3]}
    garbage = weakref.ref(_Node())
    assert garbage() is not None  # not yet collected
    collector.settle()
    assert garbage() is None  # collected before anything was frozen
    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, middle, oldest)
    assert gc.get_freeze_count() > 0
    # Frozen objects are in no generation, so no collection scans them.
    assert all(o is not survivor for o in gc.get_objects())
    later: list[object] = [[]]  # a list is always tracked
    assert any(o is later for o in gc.get_objects(generation=0))
