"""Tiling: covers are exact, aligned, non-overlapping and minimal; window bounds follow the
documented semantics."""

from __future__ import annotations

from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.errors import TilingError
from features.tiling import (
    READ_LAG_MS,
    cover_window,
    retention,
    tail_hop,
    validate_block_sizes,
    window_bounds,
)
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


SIZES = (5 * MINUTE, HOUR, DAY)


def test_window_bounds_semantics():
    """
    t = 16:12:30, W = 1h, b = 5m, wm = 16:05
    end = min(16:05, align_down(t) = 16:10) = 16:05 -> window [15:05, 16:05)
    """
    t = parse_timestamp("2025-11-29T16:12:30Z")
    wm = parse_timestamp("2025-11-29T16:05:00Z")
    wb = window_bounds(t, HOUR, wm, SIZES)
    assert (wb.start, wb.end) == (parse_timestamp("2025-11-29T15:05:00Z"), wm)
    # a watermark ahead of t never lets the open block in
    wb2 = window_bounds(t, HOUR, t + HOUR, SIZES)
    assert wb2.end == parse_timestamp("2025-11-29T16:10:00Z")
    # a lagging store gives the last W before its watermark, not a shorter window
    wb3 = window_bounds(t, HOUR, t - 2 * DAY, SIZES)
    assert wb3.end - wb3.start == HOUR and wb3.end <= t - 2 * DAY
    # the value depends on (W, end) only: any t at or after the watermark gives the same bounds
    assert window_bounds(t + 7 * HOUR, HOUR, wm, SIZES) == wb


def test_long_windows_step_their_oldest_edge_by_the_tail_hop():
    """
    t = 2025-11-29 16:12:30, wm = 16:10
    6h  (hop 5m): [10:10 ............................ 16:10)   exactly 6h
    1d  (hop 1h): [11-28 16:00 ...................... 16:10)   1d + 10m
    30d (hop 1d): [10-30 00:00 ...................... 16:10)   30d + 16h10m, no 5m/1h blocks
                  at the old edge: 30 daily blocks, then today's 16 hours and 2 x 5m
    """
    t = parse_timestamp("2025-11-29T16:12:30Z")
    wm = parse_timestamp("2025-11-29T16:10:00Z")
    assert window_bounds(t, 6 * HOUR, wm, SIZES).start == parse_timestamp("2025-11-29T10:10:00Z")
    assert window_bounds(t, DAY, wm, SIZES).start == parse_timestamp("2025-11-28T16:00:00Z")
    wb = window_bounds(t, 30 * DAY, wm, SIZES)
    assert wb.start == parse_timestamp("2025-10-30T00:00:00Z")
    cover = cover_window(wb.start, wb.end, SIZES)
    assert [(r.size, r.count) for r in cover.runs] == [(DAY, 30), (HOUR, 16), (5 * MINUTE, 2)]
    assert tail_hop(11 * HOUR, SIZES) == 5 * MINUTE and tail_hop(12 * HOUR, SIZES) == HOUR


def test_retention_keeps_what_any_window_reads():
    windows = (HOUR, 6 * HOUR, DAY, 7 * DAY, 30 * DAY)
    keep = retention(windows, SIZES)
    assert keep == {5 * MINUTE: 6 * HOUR + 10 * MINUTE + READ_LAG_MS,
                    HOUR: 7 * DAY + 2 * HOUR + READ_LAG_MS, DAY: 32 * DAY + READ_LAG_MS}
    # every block that any window's cover uses, for a read ending up to one block plus
    # READ_LAG_MS before the watermark wm, is younger than its size's retention at wm
    wm = parse_timestamp("2025-11-29T16:12:30Z")
    for lag in range(0, READ_LAG_MS + 5 * MINUTE + 1, MINUTE):
        t = wm - lag
        for w in windows:
            wb = window_bounds(t, w, t, SIZES)
            for start, size in cover_window(wb.start, wb.end, SIZES).blocks():
                assert start + size > wm - keep[size], (lag, w, size)


def test_bad_sizes_and_bounds_are_clear_errors():
    with pytest.raises(TilingError, match="must be a larger multiple of 5m"):
        validate_block_sizes([5 * MINUTE, 7 * MINUTE])
    with pytest.raises(TilingError, match="aligned to the finest block 5m"):
        cover_window(MINUTE, HOUR, [5 * MINUTE])
    with pytest.raises(TilingError, match="not a multiple of the block size 5m"):
        window_bounds(0, 7 * MINUTE, 0, 5 * MINUTE)


@settings(max_examples=200, deadline=None)
@given(
    chain=st.sampled_from(CHAINS),
    spans=st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 3000)), min_size=1, max_size=20),
)
def test_vectorized_covers_equal_cover_window(chain, spans):
    from features.tiling import cover_runs_many

    finest = chain[0]
    base = 1_700_000_000_000 - (1_700_000_000_000 % DAY)
    starts = [base + a * finest for a, _ in spans]
    ends = [s + n * finest for s, (_, n) in zip(starts, spans)]
    runs = cover_runs_many(starts, ends, chain)
    for i, (s, e) in enumerate(zip(starts, ends)):
        blocks = []
        for size, lo, hi in runs:
            blocks.extend((b, size) for b in range(int(lo[i]), int(hi[i]), size))
        assert sorted(blocks) == cover_window(s, e, chain).blocks()
