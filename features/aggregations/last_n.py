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

from features.aggregations.base import Aggregation
from features.errors import RepDecodeError

_HEAD = struct.Struct("<BI")  # value kind, count
_KIND_NUM, _KIND_STR = 0, 1


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

    def __repr__(self) -> str:
        return f"LastNAgg(n={self.n})"


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
