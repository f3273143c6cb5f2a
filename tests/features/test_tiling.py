"""Tiling: covers are exact, aligned, non-overlapping and minimal; window bounds follow the
documented semantics."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import TilingError
from features.tiling import cover_window, validate_block_sizes, window_bounds
from features.timeutil import DAY, HOUR, MINUTE, parse_timestamp

CHAINS = [(5 * MINUTE,), (5 * MINUTE, HOUR), (5 * MINUTE, HOUR, DAY), (MINUTE, 15 * MINUTE, HOUR)]


def test_reference_example_6h_window():
    """A request at 16:10 for 6h reads [10:10, 16:10):
    5m 10:10..11:00 | 1h 11:00..16:00 | 5m 16:00..16:10"""
    t = parse_timestamp("2025-11-29T16:10:00Z")
    cover = cover_window(t - 6 * HOUR, t, (5 * MINUTE, HOUR, DAY))
    assert [(r.size, r.count) for r in cover.runs] == [(5 * MINUTE, 10), (HOUR, 5), (5 * MINUTE, 2)]
    assert cover.n_blocks == 17


def _min_blocks_dp(start, end, sizes):
    """Brute force: the fewest aligned blocks covering [start, end)."""

    @cache
    def best(cur):
        if cur == end:
            return 0
        options = [1 + best(cur + s) for s in sizes if cur % s == 0 and cur + s <= end]
        return min(options)

    return best(start) if start < end else 0


@settings(max_examples=200, deadline=None)
@given(
    chain=st.sampled_from(CHAINS[:2] + [CHAINS[3]]),
    a=st.integers(0, 400),
    n=st.integers(0, 400),
)
def test_cover_is_exact_and_minimal(chain, a, n):
    finest = chain[0]
    start = 1_700_000_000_000 - (1_700_000_000_000 % DAY) + a * finest
    end = start + n * finest
    cover = cover_window(start, end, chain)
    blocks = cover.blocks()
    # exact, aligned, non-overlapping
    cur = start
    for b_start, size in blocks:
        assert b_start == cur and b_start % size == 0 and size in chain
        cur += size
    assert cur == end
    assert cover.n_blocks == len(blocks) == _min_blocks_dp(start, end, chain)


def test_window_bounds_semantics():
    """
    t = 16:12:30, W = 1h, b = 5m, wm = 16:05
    align_down(t) = 16:10 -> window [15:10, min(16:05, 16:10)) = [15:10, 16:05)
    """
    t = parse_timestamp("2025-11-29T16:12:30Z")
    wm = parse_timestamp("2025-11-29T16:05:00Z")
    wb = window_bounds(t, HOUR, wm, 5 * MINUTE)
    assert wb.start == parse_timestamp("2025-11-29T15:10:00Z")
    assert wb.end == wm
    # a watermark ahead of t never lets the open block in
    wb2 = window_bounds(t, HOUR, t + HOUR, 5 * MINUTE)
    assert wb2.end == parse_timestamp("2025-11-29T16:10:00Z")
    # a watermark older than the window gives an empty window, not a negative one
    wb3 = window_bounds(t, HOUR, t - 2 * DAY, 5 * MINUTE)
    assert wb3.empty and wb3.end == wb3.start


def test_bad_sizes_and_bounds_are_clear_errors():
    with pytest.raises(TilingError, match="must be a larger multiple of 5m"):
        validate_block_sizes([5 * MINUTE, 7 * MINUTE])
    with pytest.raises(TilingError, match="aligned to the finest block 5m"):
        cover_window(MINUTE, HOUR, [5 * MINUTE])
    with pytest.raises(TilingError, match="not a multiple of the block size 5m"):
        window_bounds(0, 7 * MINUTE, 0, 5 * MINUTE)
