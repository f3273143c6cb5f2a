"""``last_n``: the most recent N values of a field, with their timestamps.

Rep: a tuple of ``(ts, value)`` pairs ordered newest first, at most N long. Ties on ``ts``
are broken by the value so that ``combine`` is commutative. Values are numbers or strings
(one type per feature).
"""

from __future__ import annotations

import heapq
import struct
from typing import Any

import numpy as np

from features.aggregations.base import PENDING_LIMIT, Aggregation, RepColumn
from features.aggregations.ragged import (
    RaggedPool,
    group_positions,
    join_segments,
    ragged_ranges,
    row_cuts,
    unique_rows,
)
from features.errors import RepDecodeError
from features.interning import StringInterner

_HEAD = struct.Struct("<BI")  # value kind, count
_KIND_NUM, _KIND_STR = 0, 1
_HEAD_DTYPE = np.dtype([("kind", "u1"), ("n", "<u4")])  # _HEAD as a packed record


class LastNAgg(Aggregation):
    """Keep the ``n`` most recent (ts, value) pairs."""

    kind = "last_n"

    def __init__(self, n: int) -> None:
        if n < 1:
            raise ValueError(f"last_n needs n >= 1, got {n}")
        self.n = int(n)

    def identity(self) -> tuple:
        return ()

    def map(self, value: Any, ts: int) -> tuple:
        return ((int(ts), value),)

    def combine(self, a: tuple, b: tuple) -> tuple:
        if not a:
            return b[: self.n]
        if not b:
            return a[: self.n]
        merged = heapq.nlargest(self.n, a + b, key=_order_key)
        return tuple(merged)

    def finalize(self, rep: tuple) -> list:
        return [v for _, v in rep]

    def group_reduce(self, group_ids, n_groups, values, ts):
        reps: list[list] = [[] for _ in range(n_groups)]
        vals = values.tolist() if isinstance(values, np.ndarray) else list(values)
        for g, t, v in zip(group_ids.tolist(), ts.tolist(), vals):
            reps[g].append((t, v))
        return [tuple(heapq.nlargest(self.n, r, key=_order_key)) for r in reps]

    def to_bytes(self, rep: tuple) -> bytes:
        """Layout: kind u8 | n u32 | ts i64[n] | values f64[n], or lengths u16[n] + utf8."""
        n = len(rep)
        if n == 0:
            return _HEAD.pack(_KIND_NUM, 0)
        ts = [t for t, _ in rep]
        if isinstance(rep[0][1], str):
            raws = [v.encode() for _, v in rep]
            return _packer(f"<BI{n}q{n}H").pack(_KIND_STR, n, *ts, *map(len, raws)) + b"".join(raws)
        return _packer(f"<BI{n}q{n}d").pack(_KIND_NUM, n, *ts, *[float(v) for _, v in rep])

    def from_bytes(self, data: bytes | memoryview) -> tuple:
        data = bytes(data)
        if len(data) < _HEAD.size:
            raise RepDecodeError(f"last_n rep truncated: {len(data)} bytes")
        kind, n = _HEAD.unpack_from(data)
        pos = _HEAD.size
        if kind == _KIND_NUM:
            if len(data) != pos + 16 * n:
                raise RepDecodeError(f"last_n rep has {len(data)} bytes; {n} numeric values "
                                     f"need {pos + 16 * n}")
            vals = _packer(f"<{n}q{n}d").unpack_from(data, pos)
            return tuple(zip(vals[:n], vals[n:]))
        if kind != _KIND_STR:
            raise RepDecodeError(f"last_n rep has unknown value kind {kind}")
        if len(data) < pos + 10 * n:
            raise RepDecodeError(f"last_n rep truncated: {n} string values need more bytes")
        head = _packer(f"<{n}q{n}H").unpack_from(data, pos)
        ts, lens = head[:n], head[n:]
        pos += 10 * n
        if len(data) != pos + sum(lens):
            raise RepDecodeError("last_n rep truncated inside its string values")
        vals = []
        for ln in lens:
            vals.append(data[pos:pos + ln].decode())
            pos += ln
        return tuple(zip(ts, vals))

    def new_column(self, state: Any = None) -> LastNColumn:
        return LastNColumn(self.n, state)

    def __repr__(self) -> str:
        return f"LastNAgg(n={self.n})"


class LastNColumn(RepColumn):
    """Columnar ``last_n`` reps: each row's newest ``n`` (ts, value) entries in a ``RaggedPool``.

    Folded events wait in a pending list; before a flush, an eviction or a snapshot they are
    merged into the rows they touch (gather those rows' entries, sort all by row, newest
    first, ties by value, keep ``n`` per row, write back), and ``serialize`` writes the bytes
    of ``LastNAgg.to_bytes`` for many rows with numpy. String values are interned to codes.
    """

    def __init__(self, n: int, state: dict | None = None) -> None:
        self.n = n
        self.kind: int | None = None
        self.strings = StringInterner()
        self.pool: RaggedPool | None = None
        self.capacity = 0
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        if state is not None and state.get("kind") is not None:
            self._set_kind(state["kind"])
            self.strings = StringInterner(list(state.get("strings", [])))
            self.pool = RaggedPool.from_state(self._dtypes(), state["pool"])
            self.capacity = len(state["pool"]["counts"])

    def _dtypes(self) -> dict[str, type]:
        return {"ts": np.int64, "val": np.int64 if self.kind == _KIND_STR else np.float64}

    def _set_kind(self, kind: int) -> None:
        if self.kind is None:
            self.kind = kind
            self.pool = RaggedPool(self._dtypes())
            self.pool.resize(self.capacity)
        elif self.kind != kind:
            raise ValueError("last_n values must be all strings or all numbers")

    def resize(self, capacity: int) -> None:
        self.capacity = max(self.capacity, capacity)
        if self.pool is not None:
            self.pool.resize(capacity)

    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        if hasattr(values, "codes"):
            self._set_kind(_KIND_STR)
            codes = np.asarray(values.codes)
            vals = self.strings.intern(values.dictionary)[codes] if len(codes) else codes
        else:
            self._set_kind(_KIND_NUM)
            vals = np.asarray(values, dtype=np.float64)
        self._pending.append((np.asarray(rows, np.int64), np.asarray(ts, np.int64),
                              np.asarray(vals)))
        self._pending_n += len(rows)
        if self._pending_n >= PENDING_LIMIT:  # memory stays bounded between flushes
            self._settle()

    def _settle(self) -> None:
        if not self._pending:
            return
        pool = self.pool
        assert pool is not None
        rows = np.concatenate([p[0] for p in self._pending])
        ts = np.concatenate([p[1] for p in self._pending])
        vals = np.concatenate([p[2] for p in self._pending])
        self._pending, self._pending_n = [], 0
        uniq, inv = unique_rows(rows, len(pool.count))
        old, counts = pool.gather(uniq)
        g = np.concatenate((np.repeat(np.arange(len(uniq), dtype=np.int64), counts), inv))
        t = np.concatenate((old["ts"], ts))
        v = np.concatenate((old["val"], vals.astype(old["val"].dtype, copy=False)))
        if self.kind == _KIND_STR:
            order = self._order_strings(g, t, v)
        else:
            order = np.lexsort((-v, -t, g))
        total = np.bincount(g, minlength=len(uniq))
        keep = group_positions(total) < self.n
        sel = order[keep]
        pool.write(uniq, np.minimum(total, self.n), {"ts": t[sel], "val": v[sel]},
                   max_cap=self.n)

    def _order_strings(self, g: np.ndarray, t: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """Row, newest first; equal times ordered by the string value, largest first."""
        order = _row_newest_first(g, t)
        gs, ts_sorted = g[order], t[order]
        tie = np.flatnonzero((gs[1:] == gs[:-1]) & (ts_sorted[1:] == ts_sorted[:-1]))
        if len(tie):  # rare: order each run of equal (row, ts) by value, in Python
            words = self.strings.values
            starts = tie[np.concatenate(([True], np.diff(tie) > 1))]
            for a in starts.tolist():
                b = a + 1
                while b < len(order) and gs[b] == gs[a] and ts_sorted[b] == ts_sorted[a]:
                    b += 1
                run = order[a:b].tolist()
                order[a:b] = sorted(run, key=lambda i: words[codes[i]], reverse=True)
        return order

    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        if self.pool is None:
            return _HEAD.pack(_KIND_NUM, 0) * len(rows), np.full(len(rows), _HEAD.size, np.int64)
        self._settle()
        entries, k = self.pool.gather(rows)
        head = np.zeros(len(rows), dtype=_HEAD_DTYPE)
        head["kind"] = np.where(k > 0, self.kind, _KIND_NUM)
        head["n"] = k
        parts = [(head, _HEAD.size * np.arange(len(rows) + 1, dtype=np.int64)),
                 (entries["ts"].astype("<i8"), row_cuts(k, 8))]
        if self.kind == _KIND_STR:
            blob, offsets = self.strings.utf8()
            codes = entries["val"]
            lens = offsets[codes + 1] - offsets[codes]
            g = np.repeat(np.arange(len(rows), dtype=np.int64), k)
            text = np.bincount(g, weights=lens, minlength=len(rows)).astype(np.int64)
            parts += [(lens.astype("<u2"), row_cuts(k, 2)),
                      (blob[ragged_ranges(offsets[codes], lens)], row_cuts(text))]
            size = _HEAD.size + 10 * k + text
        else:
            parts.append((entries["val"].astype("<f8"), row_cuts(k, 8)))
            size = _HEAD.size + 16 * k
        return join_segments(len(rows), parts), size

    def keep(self, rows: np.ndarray) -> None:
        self.capacity = len(rows)
        if self.pool is not None:
            self._settle()
            self.pool.keep(np.asarray(rows, np.int64))

    def state(self, n: int) -> dict:
        if self.pool is None:
            return {"kind": None}
        self._settle()
        strings = self.strings.values.tolist() if self.kind == _KIND_STR else []
        return {"kind": self.kind, "strings": strings, "pool": self.pool.state(n)}



def _row_newest_first(g: np.ndarray, t: np.ndarray) -> np.ndarray:
    """An order of entries by row ``g`` (ascending), then time ``t`` (newest first).

    Entries equal in both may come in any order. One sort of a packed int64 key when row
    and time span fit in 63 bits (they do for any shard), else a two-key ``lexsort``.
    """
    if not len(g):
        return np.zeros(0, np.int64)
    t_max = int(t.max())
    t_bits = (t_max - int(t.min())).bit_length()
    if int(g.min()) >= 0 and int(g.max()).bit_length() + t_bits <= 63:
        key = g << t_bits
        key |= t_max - t
        return np.argsort(key, kind="stable")
    return np.lexsort((-t, g))


def _order_key(pair: tuple) -> tuple:
    """Newest first; equal timestamps ordered by value so combine is commutative."""
    return pair


_PACKERS: dict[str, struct.Struct] = {}


def _packer(fmt: str) -> struct.Struct:
    """A cached ``struct.Struct`` (formats repeat: one per list length)."""
    p = _PACKERS.get(fmt)
    if p is None:
        if len(_PACKERS) > 4096:
            _PACKERS.clear()
        p = _PACKERS[fmt] = struct.Struct(fmt)
    return p
