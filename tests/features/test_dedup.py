"""Counting an event id once within a horizon (``features.dedup.SeenIds``), against a
one-event-at-a-time reference."""

from __future__ import annotations

import numpy as np
import pytest

from features.dedup import SeenIds


def test_repeats_within_the_horizon_are_dropped_and_first_copies_in_a_batch_kept():
    seen = SeenIds(horizon_ms=60_000)
    h = np.array([5, 7, 5, 9, 7], dtype=np.uint64)
    ts = np.array([1_000, 1_001, 1_002, 1_003, 1_004])
    assert seen.admit(h, ts).tolist() == [True, True, False, True, False]
    assert seen.admit(np.array([9, 11], dtype=np.uint64), np.array([2_000, 2_001])).tolist() \
        == [False, True]
    assert len(seen) == 4


def test_against_a_dict_reference_over_many_batches_and_runs():
    rng = np.random.default_rng(3)
    horizon = 100_000
    seen = SeenIds(horizon_ms=horizon)
    seen.STAGE_IDS = 256  # many runs and merges
    last_admitted: dict[int, int] = {}  # id -> event time of its admitted copy
    t = 0
    for _ in range(400):
        n = int(rng.integers(1, 300))
        ids = rng.integers(0, 20_000, n).astype(np.uint64)
        ts = t + np.sort(rng.integers(0, 500, n))
        t += 500
        got = seen.admit(ids, ts)
        newest = seen.max_ts
        for i, (k, e) in enumerate(zip(ids.tolist(), ts.tolist())):
            prev = last_admitted.get(k)
            if prev is not None and prev >= newest - horizon:
                assert not got[i], (k, prev, e)  # inside the horizon: always a duplicate
            elif prev is not None and prev < newest - 2 * horizon:
                assert got[i], (k, prev, e)  # long expired: counted again
            if got[i]:
                last_admitted[k] = e
        # memory follows the horizon, not the stream
        assert len(seen) <= 2.5 * 20_000


def test_memory_stays_flat_over_a_long_stream_of_unique_ids():
    seen = SeenIds(horizon_ms=10_000)
    seen.STAGE_IDS = 1_000
    sizes = []
    for b in range(2_000):
        ids = np.arange(b * 100, (b + 1) * 100, dtype=np.uint64)
        ts = np.full(100, b * 100)  # 1,000 ids per 1,000 ms: 10,000 in a horizon
        assert seen.admit(ids, ts).all()
        sizes.append(len(seen))
    assert max(sizes[1_000:]) <= 1.5 * 10_000 + 2 * seen.STAGE_IDS
    assert max(sizes[1_000:]) <= max(sizes[:1_000]) * 1.01 + seen.STAGE_IDS


def test_a_positive_horizon_is_required():
    with pytest.raises(ValueError, match="horizon_ms must be positive"):
        SeenIds(0)


def test_oldest_offset_follows_what_is_remembered():
    seen = SeenIds(horizon_ms=10_000)
    seen.STAGE_IDS = 4
    assert seen.oldest_offset is None
    seen.admit(np.array([1, 2], dtype=np.uint64), np.array([0, 0]), offset=100)
    assert seen.oldest_offset == 100
    seen.admit(np.array([3, 4, 5], dtype=np.uint64), np.array([5_000] * 3), offset=110)
    assert seen.oldest_offset == 100  # sealed into one run with the first ids
    # a batch of repeats only remembers nothing new: its offset does not count
    seen.admit(np.array([1, 3], dtype=np.uint64), np.array([6_000, 6_000]), offset=90)
    assert seen.oldest_offset == 100
    seen.admit(np.array([6], dtype=np.uint64), np.array([30_000]), offset=120)
    assert seen.oldest_offset == 120  # the older run expired past the horizon
    seen.rebase(0)  # the log started over
    assert seen.oldest_offset == 0
