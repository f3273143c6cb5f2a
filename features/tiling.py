"""Window semantics and block tiling: the one function online and offline reads share.

Window semantics (the contract every path follows)
-------------------------------------------------
All times are integer epoch milliseconds, UTC. Blocks are epoch-aligned half-open intervals
``[start, start + size)``; an event with time ``ts`` belongs to the block of each size whose
interval contains ``ts``. For a read at request time ``t`` of a window of length ``W`` with
feature watermark ``wm`` and block sizes ``b = b0 < b1 < ...`` (5m, 1h, 1d):

* ``W`` is a multiple of ``b``;
* ``wm`` is the end of the last block the store trusts (sealed: the stream's event-time
  watermark has passed it). The open block, and anything at or after ``wm``, is never read;
* the window ends at the last block boundary at or before both: ``end = align_down(min(wm, t), b)``;
* the window's tail hop ``h = tail_hop(W)`` is the largest block size with ``W >= 12 h``
  (5m for windows under 12h, 1h from 12h, 1d from 12d);
* the window is ``[align_down(end - W, h), end)``.

So a window value counts exactly the events with ``start <= event_ts < end``, and it is a
function of ``(W, end)`` alone. Consequences, all on purpose:

* The offline backfill needs only the watermark logged with the impression to recompute
  exactly what the online read saw, with this same function over the same blocks.
* Pre-assembled values and caches keyed by the watermark are exact, not approximations.
* When the store lags, the window is the last ``W`` before the watermark (stale, and flagged
  stale by the feature client), never a shorter window.
* The oldest edge moves in steps of the tail hop (as in Chronon's resolution), so a window
  reaches back up to one hop (at most 1/12 of ``W``) further than ``W``: a 30-day window is
  30 to 31 days of daily blocks plus today's hours, never a 5-minute block from 30 days ago.
  That bounds both what a read touches and what the store keeps (``retention``).

Tiling
------
``cover_window`` covers ``[start, end)`` with the fewest aligned, non-overlapping blocks: at
each point it takes the largest available size that is aligned there and still fits. With
block sizes that each divide the next (5m | 1h | 1d) this greedy choice is optimal, and the
blocks of one size form at most two runs (left edge and right edge of the coarser middle).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np

from features.errors import TilingError
from features.timeutil import align_down, format_duration


@dataclass(frozen=True)
class BlockRun:
    """Consecutive aligned blocks of one ``size`` covering ``[start, end)``."""

    size: int
    start: int
    end: int

    @property
    def count(self) -> int:
        """Number of blocks in the run."""
        return (self.end - self.start) // self.size


@dataclass(frozen=True)
class BlockCover:
    """The fewest aligned blocks covering ``[start, end)``, grouped into runs."""

    start: int
    end: int
    runs: tuple[BlockRun, ...]

    @property
    def n_blocks(self) -> int:
        """Total number of blocks."""
        return sum(r.count for r in self.runs)

    def blocks(self) -> list[tuple[int, int]]:
        """Every block as ``(start, size)`` in time order."""
        out = []
        for r in sorted(self.runs, key=lambda r: r.start):
            out.extend((s, r.size) for s in range(r.start, r.end, r.size))
        return out


@dataclass(frozen=True)
class WindowBounds:
    """The half-open event-time interval a windowed read covers."""

    start: int
    end: int

    @property
    def empty(self) -> bool:
        """Whether the interval holds no time at all."""
        return self.end <= self.start


def validate_block_sizes(sizes: Sequence[int]) -> tuple[int, ...]:
    """Return ``sizes`` if ascending, positive, and each dividing the next.

    Raises:
        TilingError: naming the offending pair and the fix.
    """
    sizes = tuple(int(s) for s in sizes)
    if not sizes:
        raise TilingError("at least one block size is needed, e.g. [5m, 1h, 1d]")
    if sizes[0] <= 0:
        raise TilingError(f"block sizes must be positive, got {sizes[0]} ms")
    for a, b in pairwise(sizes):
        if b <= a or b % a:
            raise TilingError(
                f"block size {format_duration(b)} must be a larger multiple of "
                f"{format_duration(a)}; list sizes ascending, each dividing the next "
                "(e.g. 5m, 1h, 1d)"
            )
    return sizes


TAIL_HOPS = 12
"""A window uses tail hop ``h`` only if it spans at least this many ``h``-blocks."""


def tail_hop(window: int, sizes: Sequence[int]) -> int:
    """Return the block size the oldest edge of ``window`` is aligned to.

    The largest of ``sizes`` with ``window >= TAIL_HOPS * size``; the finest size otherwise.
    """
    hop = sizes[0]
    for size in sizes:
        if window >= TAIL_HOPS * size:
            hop = size
    return hop


def window_bounds(t: int, window: int, watermark: int, sizes: Sequence[int] | int) -> WindowBounds:
    """Return the interval a read at ``t`` of ``window`` ms covers, given watermark ``wm``.

    ``end = align_down(min(wm, t), b)`` and ``[align_down(end - window, tail_hop(window)), end)``
    with ``b`` the finest size; see the module docstring. Passing a single int size means no
    coarser blocks (the tail hop is then that size).

    Raises:
        TilingError: ``window`` is not a positive multiple of the finest size.
    """
    sizes = (sizes,) if isinstance(sizes, int) else tuple(sizes)
    finest = sizes[0]
    if window <= 0 or window % finest:
        raise TilingError(
            f"window {format_duration(window)} is not a multiple of the block size "
            f"{format_duration(finest)}"
        )
    end = align_down(min(watermark, align_down(t, finest)), finest)
    start = align_down(end - window, tail_hop(window, sizes))
    return WindowBounds(start=start, end=end)


READ_LAG_MS = 15 * 60_000
"""How far behind a family's watermark a read may end and still find every block it needs.

One request reads every family at one end, the lowest of their watermarks; a family ahead
of the others by up to this much (a quiet topic, a trailing snapshot) still serves that end.
"""


def retention(windows: Sequence[int], sizes: Sequence[int]) -> dict[int, int]:
    """How long blocks of each size must be kept so every window can be read: ``{size: ms}``.

    A block of size ``s`` is needed at the recent edge of any window (up to the next larger
    size back from now) and at the old edge of windows whose tail hop is at most ``s``, by
    reads ending up to one block plus ``READ_LAG_MS`` before the watermark. A block whose
    end is older than ``now - retention[size]`` is never read again.
    """
    sizes = validate_block_sizes(sizes)
    out = {}
    for i, size in enumerate(sizes):
        need = sizes[i + 1] if i + 1 < len(sizes) else size
        for w in windows:
            hop = tail_hop(w, sizes)
            if hop <= size:
                need = max(need, w + hop)
        out[size] = need + size + READ_LAG_MS
    return out


def cover_window(start: int, end: int, sizes: Sequence[int]) -> BlockCover:
    """Cover ``[start, end)`` with the fewest aligned non-overlapping blocks of ``sizes``.

    Args:
        start, end: interval bounds, both multiples of the finest size.
        sizes: available block sizes, ascending, each dividing the next.

    Raises:
        TilingError: bounds not aligned to the finest size, or bad sizes.
    """
    sizes = validate_block_sizes(sizes)
    finest = sizes[0]
    if start % finest or end % finest:
        raise TilingError(
            f"window bounds must be aligned to the finest block {format_duration(finest)}; "
            f"got start={start}, end={end}"
        )
    runs: list[BlockRun] = []
    cur = start
    while cur < end:
        size = _largest_fitting(cur, end, sizes)
        # Take blocks of this size until a coarser block becomes aligned and fits, or the end.
        stop = cur + ((end - cur) // size) * size
        for bigger in sizes:
            if bigger <= size:
                continue
            boundary = cur + (-cur % bigger)
            if boundary + bigger <= end:
                stop = min(stop, boundary)
        runs.append(BlockRun(size, cur, stop))
        cur = stop
    return BlockCover(start=start, end=end, runs=tuple(runs))


def _largest_fitting(cur: int, end: int, sizes: Sequence[int]) -> int:
    for size in reversed(sizes):
        if cur % size == 0 and cur + size <= end:
            return size
    raise TilingError(f"no block size fits at {cur} before {end}")  # unreachable when aligned


def cover_runs_many(
    starts: np.ndarray, ends: np.ndarray, sizes: Sequence[int]
) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Vectorized ``cover_window`` for many intervals at once.

    Returns ``[(size, run_start, run_end), ...]``: for each size, the (possibly empty, then
    ``run_start == run_end``) runs of that size in each interval's minimal cover; an interval
    has at most one run per size on each side of its coarsest run, so there are at most
    ``2 * len(sizes) - 1`` entries. Every interval must be aligned to the finest size.
    """
    sizes = validate_block_sizes(sizes)
    starts = np.asarray(starts, dtype=np.int64)
    ends = np.maximum(np.asarray(ends, dtype=np.int64), starts)
    out: list[tuple[int, np.ndarray, np.ndarray]] = []

    def cover(lo: np.ndarray, hi: np.ndarray, level: int) -> None:
        size = sizes[level]
        if level == 0:
            out.append((size, lo, hi))
            return
        inner_lo = lo + (-lo % size)
        inner_hi = hi - (hi % size)
        has = inner_hi > inner_lo
        inner_lo = np.where(has, inner_lo, hi)  # no run of this size: all to the finer sizes
        inner_hi = np.where(has, inner_hi, hi)
        cover(lo, inner_lo, level - 1)
        out.append((size, inner_lo, inner_hi))
        cover(inner_hi, hi, level - 1)

    cover(starts, ends, len(sizes) - 1)
    return out
