"""bridge/options.py ``tune_gc``: what exists before serving is out of the collector's sight, young
collections wait for the threshold, and cycles made later are still collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from bridge.options import GC_THRESHOLD, tune_gc


@pytest.fixture
def restored_gc() -> Iterator[None]:
    threshold = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class _Node:
    def __init__(self) -> None:
        self.other: _Node | None = None


def _watched(obj: object) -> bool:
    """Whether the collector's generations hold ``obj`` (frozen objects are in none of them)."""
    return any(o is obj for o in gc.get_objects())


def test_what_exists_is_frozen_and_later_cycles_are_still_collected(restored_gc: None) -> None:
    early = _Node()
    assert _watched(early)
    tune_gc()
    assert gc.get_freeze_count() > 1000  # the modules' objects, and ``early``
    assert not _watched(early), "what existed before tune_gc() is still walked by every collection"
    a, b = _Node(), _Node()
    a.other, b.other = b, a  # a cycle: reference counting alone never frees it
    assert _watched(a)
    gone = weakref.ref(a)
    del a, b
    gc.collect()
    assert gone() is None, "a cycle made after tune_gc() must still be collected"


def test_young_collections_wait_for_the_threshold(restored_gc: None) -> None:
    tune_gc()
    assert gc.get_threshold() == GC_THRESHOLD
    young: list[int] = []

    def seen(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] == 0:
            young.append(1)

    gc.callbacks.append(seen)
    try:
        kept: list[list[int]] = [[] for _ in range(5_000)]  # CPython's default collects every 700
        assert not young, "a young collection ran long before GC_THRESHOLD objects were made"
        kept += [[] for _ in range(GC_THRESHOLD[0])]
        assert young, "no young collection once past the threshold"
    finally:
        gc.callbacks.remove(seen)
