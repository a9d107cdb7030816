"""segloop.review.chunks: write-behind chunk cache (budget, ordering, failed flushes)."""

from __future__ import annotations

import numpy as np
import pytest

from segloop.review.chunks import ChunkCache


def make(budget: int, fail_first: bool = False):
    disk = {(0, 0, i): np.full((4, 4), i, np.uint8) for i in range(8)}
    applied: list[int] = []
    failures = [fail_first]

    def write(level, chunks):
        if failures[0]:
            failures[0] = False
            raise OSError("disk full")
        disk.update({k: c.copy() for k, c in chunks.items()})

    cache = ChunkCache(lambda k: disk[k].copy(), write, applied.extend, budget=budget)
    return cache, disk, applied


def test_put_is_visible_at_once_and_flushed_in_order():
    cache, disk, applied = make(budget=1 << 20)
    assert cache.get((0, 0, 3))[0, 0] == 3
    for edit_id, value in enumerate((10, 11, 12), start=1):
        cache.put(edit_id, {(0, 0, 3): np.full((4, 4), value, np.uint8)})
        assert cache.get((0, 0, 3))[0, 0] == value  # the newest, flushed or not
    cache.drain()
    assert disk[0, 0, 3][0, 0] == 12 and applied == [1, 2, 3]
    with pytest.raises(ValueError):
        cache.get((0, 0, 3))[0, 0] = 1  # read-only: writers copy
    cache.close()


def test_budget_drops_clean_chunks_only():
    cache, disk, _ = make(budget=3 * 16, fail_first=True)  # three 4×4 chunks
    cache.put(1, {(0, 0, 0): np.full((4, 4), 9, np.uint8)})  # its flush fails: stays dirty
    with pytest.raises(OSError):
        cache.drain()
    for i in range(1, 8):
        cache.get((0, 0, i))
    assert cache._bytes <= 3 * 16
    assert disk[0, 0, 0][0, 0] == 0 and cache.get((0, 0, 0))[0, 0] == 9  # kept, unflushed
    cache.close()


def test_a_failed_flush_is_retried_and_its_edits_stay_unapplied_until_then():
    cache, disk, applied = make(budget=1 << 20, fail_first=True)
    cache.put(1, {(0, 0, 1): np.full((4, 4), 9, np.uint8)})
    with pytest.raises(OSError):
        cache.drain()
    assert applied == [] and disk[0, 0, 1][0, 0] == 1
    assert cache.get((0, 0, 1))[0, 0] == 9  # still served from memory
    cache.put(2, {(0, 0, 2): np.full((4, 4), 8, np.uint8)})
    cache.drain()
    assert applied == [1, 2] and disk[0, 0, 1][0, 0] == 9 and disk[0, 0, 2][0, 0] == 8
    cache.close()
