"""The columnar helpers of ``features.aggregations.ragged`` against their plain numpy meaning."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregations.ragged import (
    join_segments,
    row_cuts,
    sorted_unique,
    stable_order,
    unique_rows,
)
from features.aggregations.sketches import unique_pairs


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 400), capacity=st.integers(1, 3000))
def test_unique_rows_is_np_unique(seed, n, capacity):
    rows = np.random.default_rng(seed).integers(0, capacity, n)
    uniq, inv = unique_rows(rows, capacity)  # dense when n >= capacity / 8, else a sort
    want_u, want_i = np.unique(rows, return_inverse=True)
    assert np.array_equal(uniq, want_u) and np.array_equal(inv, want_i)
    assert inv.dtype == np.int64


@pytest.mark.parametrize("high", [5, 2**20, 2**62])  # packed, packed, too wide: argsort
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300))
def test_stable_order_is_a_stable_argsort(high, seed, n):
    keys = np.random.default_rng(seed).integers(0, high, n)
    assert np.array_equal(stable_order(keys), np.argsort(keys, kind="stable"))


def test_sorted_unique():
    values = np.array([1, 1, 3, 7, 7, 7, 9])
    uniq, inv = sorted_unique(values)
    assert uniq.tolist() == [1, 3, 7, 9] and inv.tolist() == [0, 0, 1, 2, 2, 2, 3]
    assert [len(a) for a in sorted_unique(np.zeros(0, np.int64))] == [0, 0]


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 300), groups=st.integers(1, 2**33),
       hash_bits=st.sampled_from([3, 64]))
def test_unique_pairs_is_a_lexsort(seed, n, groups, hash_bits):
    """Packed (groups under 2**32) or not, few distinct hashes (ties) or full 64-bit ones."""
    rng = np.random.default_rng(seed)
    g = rng.integers(0, groups, n)
    h = rng.integers(0, 2**hash_bits, n, dtype=np.uint64)
    order = np.lexsort((h, g))
    gs, hs = g[order], h[order]
    first = np.ones(n, dtype=bool)
    first[1:] = (gs[1:] != gs[:-1]) | (hs[1:] != hs[:-1])
    got_g, got_h = unique_pairs(g, h)
    assert np.array_equal(got_g, gs[first]) and np.array_equal(got_h, hs[first])


def test_unique_pairs_exact_when_packed_keys_collide():
    """Hashes equal but for the bits the packed key drops sort by the whole hash."""
    g = np.array([1, 1, 0, 1], np.int64)  # one group bit: the key drops each hash's lowest
    h = np.array([(5 << 40) | 9, (5 << 40) | 8, 7, (5 << 40) | 9], np.uint64)
    got_g, got_h = unique_pairs(g, h)
    assert got_g.tolist() == [0, 1, 1]
    assert got_h.tolist() == [7, (5 << 40) | 8, (5 << 40) | 9]


def test_join_segments_concatenates_each_rows_parts():
    counts = np.array([2, 0, 1])
    a = np.array([1, 2, 3], "<u2")  # 2 bytes an entry
    b = np.frombuffer(b"xyz", np.uint8)
    text_cuts = np.array([0, 1, 1, 3])
    out = join_segments(3, [(a, row_cuts(counts, 2)), (b, text_cuts)])
    want = (a[:2].tobytes() + b"x") + b"" + (a[2:].tobytes() + b"yz")
    assert out == want
    assert join_segments(0, []) == b""
