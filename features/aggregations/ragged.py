"""Variable-length rows of entries in flat numpy arrays: the storage of columnar list reps.

``RaggedPool`` keeps, for each row, a segment ``[start, start + count)`` of one shared pool of
entries (several parallel fields, e.g. a timestamp and a value). Rewriting a batch of rows
gathers their segments, lets the caller merge them with new entries, and writes the results
back in place when they fit, or at the end of the pool when they grow; holes are reclaimed by
compacting the pool once they make up half of it. Every step is vectorized over all rows of
the batch: no Python per row or per entry.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def ragged_ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Concatenate ``arange(starts[i], starts[i] + counts[i])`` over i (vectorized)."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    ends = np.cumsum(counts)
    shift = np.repeat(np.asarray(starts, np.int64) - (ends - counts), counts)
    return np.arange(total, dtype=np.int64) + shift


def group_positions(counts: np.ndarray) -> np.ndarray:
    """For groups of ``counts`` consecutive entries, each entry's position within its group."""
    counts = np.asarray(counts, np.int64)
    total = int(counts.sum())
    starts = np.cumsum(counts) - counts
    return np.arange(total, dtype=np.int64) - np.repeat(starts, counts)


def unique_rows(rows: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(rows, return_inverse=True)`` for row numbers in ``[0, capacity)``.

    When the rows are many against ``capacity`` (a flush settles millions of entries into a
    shard's rows) a mark array and a lookup table replace the sort: linear, and about ten
    times faster than ``np.unique``; otherwise ``np.unique``.
    """
    rows = np.asarray(rows, np.int64)
    n = len(rows)
    if n == 0 or capacity > 8 * n:
        uniq, inv = np.unique(rows, return_inverse=True)
        return uniq, inv.reshape(-1).astype(np.int64, copy=False)
    mark = np.zeros(capacity, dtype=bool)
    mark[rows] = True
    uniq = np.flatnonzero(mark)
    lookup = np.empty(capacity, dtype=np.int64)
    lookup[uniq] = np.arange(len(uniq), dtype=np.int64)
    return uniq, lookup[rows]


def stable_order(keys: np.ndarray) -> np.ndarray:
    """``np.argsort(keys, kind="stable")`` for non-negative int64 keys.

    When key and position fit in 63 bits together, each key is packed with its position
    and the packed values sorted directly (no indirection, about twice as fast).
    """
    keys = np.asarray(keys, np.int64)
    n = len(keys)
    if n == 0:
        return np.zeros(0, np.int64)
    pos_bits = max(int(n - 1).bit_length(), 1)
    if int(keys.min()) < 0 or int(keys.max()).bit_length() + pos_bits > 63:
        return np.argsort(keys, kind="stable")
    packed = keys << pos_bits
    packed |= np.arange(n, dtype=np.int64)
    packed.sort(kind="stable")  # timsort: sorted runs in the input merge in linear time
    packed &= (1 << pos_bits) - 1
    return packed


def sorted_unique(sorted_values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(v, return_inverse=True)`` for values already sorted (linear)."""
    n = len(sorted_values)
    first = np.ones(n, dtype=bool)
    if n:
        first[1:] = sorted_values[1:] != sorted_values[:-1]
    return sorted_values[first], np.cumsum(first, dtype=np.int64) - 1


def put_bytes(out: np.ndarray, starts: np.ndarray, values: np.ndarray) -> None:
    """Write each value's little-endian bytes into the uint8 array ``out`` at ``starts[i]``."""
    if not len(values):
        return
    width = values.dtype.itemsize
    raw = np.ascontiguousarray(values).view(np.uint8).reshape(len(values), width)
    out[np.asarray(starts, np.int64)[:, None] + np.arange(width)] = raw


def join_segments(n: int, parts: list[tuple[np.ndarray, np.ndarray]]) -> bytes:
    """Concatenate, for each of ``n`` rows, its segment of every part, in part order.

    A part is ``(data, cuts)``: the bytes of all rows back to back (any fixed-width numpy
    array; its raw bytes are used) and int64 ``cuts[n + 1]``, row ``i``'s segment being
    ``data[cuts[i]:cuts[i + 1]]`` in bytes. Arrow's element-wise join copies the segments
    in C: every row's bytes end up contiguous without a per-byte index.
    """
    if n == 0:
        return b""
    arrays = [
        pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), n,
            [None, pa.py_buffer(np.ascontiguousarray(cuts, np.int64)),
             pa.py_buffer(np.ascontiguousarray(data))])
        for data, cuts in parts
    ]
    joined = pc.binary_join_element_wise(*arrays, pa.scalar(b"", pa.large_binary()))
    offsets = np.frombuffer(joined.buffers()[1], np.int64, n + 1, 8 * joined.offset)
    return bytes(memoryview(joined.buffers()[2])[int(offsets[0]):int(offsets[-1])])  # 1 copy


def row_cuts(counts: np.ndarray, width: int = 1) -> np.ndarray:
    """Byte cuts ``[0, w*c0, w*(c0+c1), ...]`` of rows of ``counts`` entries of ``width`` bytes."""
    cuts = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=cuts[1:])
    if width != 1:
        cuts *= width
    return cuts


class RaggedPool:
    """Per-row segments of entries with fields ``dtypes`` (name -> numpy dtype)."""

    def __init__(self, dtypes: dict[str, np.dtype | type]) -> None:
        self.dtypes = {k: np.dtype(v) for k, v in dtypes.items()}
        self.pool = {k: np.zeros(0, dt) for k, dt in self.dtypes.items()}
        self.used = 0  # pool slots handed out (live or holes)
        self.live = 0  # slots in live segments
        self.start = np.zeros(0, np.int64)
        self.count = np.zeros(0, np.int64)
        self.cap = np.zeros(0, np.int64)

    def resize(self, capacity: int) -> None:
        """Make rows ``0..capacity-1`` addressable (new rows are empty)."""
        n = len(self.start)
        if capacity > n:
            size = max(capacity, 2 * n, 1024)
            for name in ("start", "count", "cap"):
                grown = np.zeros(size, np.int64)
                grown[:n] = getattr(self, name)
                setattr(self, name, grown)

    def gather(self, rows: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Return the entries of ``rows`` (row by row, segment order) and each row's count."""
        counts = self.count[rows]
        idx = ragged_ranges(self.start[rows], counts)
        return {k: v[idx] for k, v in self.pool.items()}, counts

    def write(self, rows: np.ndarray, counts: np.ndarray, entries: dict[str, np.ndarray],
              max_cap: int | None = None) -> None:
        """Replace the segments of ``rows`` (unique) with ``entries`` (grouped row by row)."""
        counts = np.asarray(counts, np.int64)
        fits = counts <= self.cap[rows]
        moved = rows[~fits]
        self.live += int(counts.sum() - self.count[rows].sum())
        if len(moved):
            new_cap = np.maximum(counts[~fits], 2 * counts[~fits])
            if max_cap is not None:
                new_cap = np.minimum(new_cap, max(max_cap, 1))
                new_cap = np.maximum(new_cap, counts[~fits])
            starts = self.used + np.cumsum(new_cap) - new_cap
            self._reserve(self.used + int(new_cap.sum()))
            self.used += int(new_cap.sum())
            self.start[moved] = starts
            self.cap[moved] = new_cap
        self.count[rows] = counts
        dest = ragged_ranges(self.start[rows], counts)
        for k, v in entries.items():
            self.pool[k][dest] = v
        if self.used > 4096 and self.used > 2 * max(self.live, 1):
            self.compact(len(self.start))

    def _reserve(self, need: int) -> None:
        size = len(next(iter(self.pool.values()))) if self.pool else 0
        if need > size:
            new_size = max(need, 2 * size, 4096)
            for k, v in self.pool.items():
                grown = np.zeros(new_size, v.dtype)
                grown[:self.used] = v[:self.used]
                self.pool[k] = grown

    def compact(self, n_rows: int) -> None:
        """Rewrite the pool with the segments of rows ``0..n_rows-1`` back to back, no holes."""
        rows = np.arange(n_rows, dtype=np.int64)
        entries, counts = self.gather(rows)
        self.pool = {k: v.copy() for k, v in entries.items()}
        self.start[:n_rows] = np.cumsum(counts) - counts
        self.cap[:n_rows] = counts
        self.start[n_rows:] = 0
        self.count[n_rows:] = 0
        self.cap[n_rows:] = 0
        self.used = self.live = int(counts.sum())

    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (ascending); row ``rows[j]`` becomes row ``j``."""
        self.live = int(self.count[rows].sum())
        self.start = self.start[rows]
        self.count = self.count[rows]
        self.cap = self.cap[rows]
        if self.used > 4096 and self.used > 2 * max(self.live, 1):
            self.compact(len(rows))

    def state(self, n: int) -> dict[str, np.ndarray]:
        """Rows ``0..n-1`` as plain arrays: ``counts`` and each field's entries back to back."""
        entries, counts = self.gather(np.arange(n, dtype=np.int64))
        return {"counts": counts, **entries}

    @classmethod
    def from_state(cls, dtypes: dict[str, np.dtype | type], state: dict[str, np.ndarray]
                   ) -> RaggedPool:
        """Rebuild a pool from ``state``."""
        pool = cls(dtypes)
        counts = np.asarray(state["counts"], np.int64)
        pool.resize(len(counts))
        pool.pool = {k: np.asarray(state[k], pool.dtypes[k]).copy() for k in pool.dtypes}
        n = len(counts)
        pool.start[:n] = np.cumsum(counts) - counts
        pool.count[:n] = counts
        pool.cap[:n] = counts
        pool.used = pool.live = int(counts.sum())
        return pool
