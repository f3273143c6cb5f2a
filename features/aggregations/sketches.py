"""Approximate aggregations on Apache DataSketches.

* ``approx_distinct``: exact sets of 64-bit value hashes while small, then HyperLogLog
  (``hll_sketch`` fed with those hashes), merged with ``hll_union``. Relative standard error
  about ``1.04 / sqrt(2**lg_k)`` (1.6% at lg_k=12) once a sketch; exact below the limit.
  DataSketches has no batch update for HLL, so the columnar path keeps sets in numpy and
  feeds a sketch (``map`` over the hashes, no Python bytecode per value) only for blocks past
  the limit.
* ``approx_quantile``: KLL (``kll_doubles_sketch``). Normalized rank error about 1.65% at
  k=200. Exact while a sketch holds fewer than k values; above that its compaction is
  randomized, so combine is associative and commutative within the rank error bound, not
  bit for bit.
"""

from __future__ import annotations

import struct
from collections import deque
from itertools import pairwise
from typing import Any

import datasketches as ds
import numpy as np

from features.aggregations.base import PENDING_LIMIT, Aggregation, RepColumn, plain_values
from features.aggregations.ragged import (
    RaggedPool,
    join_segments,
    put_bytes,
    row_cuts,
    sorted_unique,
    stable_order,
)
from features.errors import RepDecodeError
from features.interning import hash_strings

_HLL_TYPE = ds.tgt_hll_type.HLL_4
_TAG_EXACT, _TAG_SKETCH = 0xE1, 0xE2
_EXACT_HEAD = struct.Struct("<BI")
_EXACT_HEAD_DTYPE = np.dtype([("tag", "u1"), ("n", "<u4")])  # _EXACT_HEAD as a packed record
_NO_HASHES = np.zeros(0, np.uint64)


class ApproxDistinctAgg(Aggregation):
    """Approximate number of distinct values of a field.

    Rep: the set of distinct value hashes while it is small (at most ``exact_limit``: 1/16 of
    the HLL's registers, 256 at lg_k=12), exactly counted; past that an HLL sketch fed with
    the same hashes. Both forms merge: sets by union (becoming a sketch once the union is
    too big), sketches with ``hll_union``. Bytes: tag ``0xE1``, u32 count, sorted u64 hashes;
    or tag ``0xE2`` and the compact HLL image. A bare HLL image (the earlier format) still
    decodes.
    """

    kind = "approx_distinct"
    rep_format = 2

    def __init__(self, lg_k: int = 12) -> None:
        if not 4 <= lg_k <= 21:
            raise ValueError(f"approx_distinct needs 4 <= lg_k <= 21, got {lg_k}")
        self.lg_k = int(lg_k)
        self.exact_limit = max(16, (1 << self.lg_k) // 16)

    def identity(self) -> np.ndarray:
        return _NO_HASHES

    def map(self, value: Any, ts: int) -> np.ndarray:
        return key_hashes(np.asarray([value], dtype=object))

    def combine(self, a, b):
        if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
            return self._from_hashes(np.union1d(a, b))
        union = ds.hll_union(self.lg_k)
        for r in (a, b):
            union.update(r if not isinstance(r, np.ndarray) else self._sketch(r))
        return union.get_result(_HLL_TYPE)

    def combine_many(self, reps):
        sets = [r for r in reps if isinstance(r, np.ndarray)]
        sketches = [r for r in reps if not isinstance(r, np.ndarray)]
        merged = self._from_hashes(np.unique(np.concatenate(sets))) if sets else _NO_HASHES
        if not sketches:
            return merged
        union = ds.hll_union(self.lg_k)
        for sk in sketches:
            union.update(sk)
        if not isinstance(merged, np.ndarray):  # the sets' union outgrew the exact limit
            union.update(merged)
        elif len(merged):
            union.update(self._sketch(merged))
        return union.get_result(_HLL_TYPE)

    def finalize(self, rep) -> float:
        if isinstance(rep, np.ndarray):
            return float(len(rep))
        return float(round(rep.get_estimate()))

    def group_reduce(self, group_ids, n_groups, values, ts):
        hashes = key_hashes(values)
        g, h = unique_pairs(np.asarray(group_ids, np.int64), hashes)
        bounds = np.searchsorted(g, np.arange(n_groups + 1))
        return [self._from_hashes(h[a:b]) for a, b in pairwise(bounds.tolist())]

    def new_column(self, state: Any = None) -> DistinctColumn:
        return DistinctColumn(self, state)

    def _from_hashes(self, hashes: np.ndarray):
        """The rep of a sorted set of distinct hashes: the set, or a sketch when too big."""
        return hashes if len(hashes) <= self.exact_limit else self._sketch(hashes)

    def _sketch(self, hashes: np.ndarray) -> ds.hll_sketch:
        sk = ds.hll_sketch(self.lg_k, _HLL_TYPE)
        update_sketch(sk, hashes)
        return sk

    def to_bytes(self, rep) -> bytes:
        if isinstance(rep, np.ndarray):
            return _EXACT_HEAD.pack(_TAG_EXACT, len(rep)) + rep.astype("<u8").tobytes()
        return bytes([_TAG_SKETCH]) + bytes(rep.serialize_compact())

    def from_bytes(self, data: bytes | memoryview):
        data = bytes(data)
        if data[:1] == bytes([_TAG_EXACT]):
            if len(data) < _EXACT_HEAD.size:
                raise RepDecodeError(f"approx_distinct rep truncated: {len(data)} bytes")
            _, n = _EXACT_HEAD.unpack_from(data)
            if len(data) != _EXACT_HEAD.size + 8 * n:
                raise RepDecodeError(f"approx_distinct rep has {len(data)} bytes; {n} hashes "
                                     f"need {_EXACT_HEAD.size + 8 * n}")
            return np.frombuffer(data, "<u8", count=n, offset=_EXACT_HEAD.size).astype(np.uint64)
        image = data[1:] if data[:1] == bytes([_TAG_SKETCH]) else data
        try:
            return ds.hll_sketch.deserialize(image)
        except Exception as exc:  # the binding raises RuntimeError/ValueError variants
            raise RepDecodeError(f"approx_distinct rep is not an HLL sketch: {exc}") from exc

    def equal(self, a, b) -> bool:
        return self.finalize(a) == self.finalize(b)

    def __repr__(self) -> str:
        return f"ApproxDistinctAgg(lg_k={self.lg_k})"


class ApproxQuantileAgg(Aggregation):
    """Approximate quantile ``quantile`` of a numeric field."""

    kind = "approx_quantile"

    def __init__(self, k: int = 200, quantile: float = 0.5) -> None:
        if not 8 <= k <= 65535:
            raise ValueError(f"approx_quantile needs 8 <= k <= 65535, got {k}")
        if not 0.0 <= quantile <= 1.0:
            raise ValueError(f"approx_quantile needs 0 <= quantile <= 1, got {quantile}")
        self.k = int(k)
        self.quantile = float(quantile)

    def identity(self) -> ds.kll_doubles_sketch:
        return ds.kll_doubles_sketch(self.k)

    def map(self, value: Any, ts: int) -> ds.kll_doubles_sketch:
        sk = ds.kll_doubles_sketch(self.k)
        sk.update(float(value))
        return sk

    def combine(self, a, b):
        out = ds.kll_doubles_sketch(self.k)
        out.merge(a)
        out.merge(b)
        return out

    def combine_many(self, reps):
        out = ds.kll_doubles_sketch(self.k)
        for r in reps:
            out.merge(r)
        return out

    def finalize(self, rep) -> float | None:
        if rep.is_empty():
            return None
        return float(rep.get_quantile(self.quantile))

    def group_reduce(self, group_ids, n_groups, values, ts):
        reps = [ds.kll_doubles_sketch(self.k) for _ in range(n_groups)]
        vals = np.asarray(plain_values(values), dtype=np.float64)
        order = np.argsort(group_ids, kind="stable")
        bounds = np.searchsorted(np.asarray(group_ids)[order], np.arange(n_groups + 1))
        for g, (a, b) in enumerate(pairwise(bounds.tolist())):
            if b > a:
                reps[g].update(vals[order[a:b]])  # DataSketches' batch entry point
        return reps

    def new_column(self, state: Any = None) -> QuantileColumn:
        return QuantileColumn(self, state)

    def to_bytes(self, rep) -> bytes:
        return bytes(rep.serialize())

    def from_bytes(self, data: bytes | memoryview):
        try:
            return ds.kll_doubles_sketch.deserialize(bytes(data))
        except Exception as exc:
            raise RepDecodeError(f"approx_quantile rep is not a KLL sketch: {exc}") from exc

    def equal(self, a, b) -> bool:
        return self.to_bytes(a) == self.to_bytes(b)

    def __repr__(self) -> str:
        return f"ApproxQuantileAgg(k={self.k}, quantile={self.quantile})"


def _key(value: Any) -> str:
    """Sketch key of a value: strings as is, integral numbers without a decimal point."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def key_hashes(values: Any) -> np.ndarray:
    """uint64 hash of each value's sketch key (``_key``): strings as is, whole numbers as ints.

    A dictionary column hashes each dictionary entry once.
    """
    if values is not None and hasattr(values, "codes"):
        codes = np.asarray(values.codes)
        if not len(codes):
            return np.zeros(0, np.uint64)
        return hash_strings(np.asarray(values.dictionary, dtype=object))[codes]
    arr = np.asarray(plain_values(values))
    if not len(arr):
        return np.zeros(0, np.uint64)
    uniq, inv = np.unique(arr, return_inverse=True) if arr.dtype != object else \
        _unique_objects(arr)
    keys = np.asarray([_key(v) for v in uniq.tolist()], dtype=object)
    return hash_strings(keys)[inv]


def _unique_objects(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    index: dict[Any, int] = {}
    inv = np.fromiter((index.setdefault(v, len(index)) for v in arr.tolist()), np.int64, len(arr))
    out = np.empty(len(index), dtype=object)
    out[:] = list(index)
    return out, inv


def unique_pairs(groups: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (group, hash) pairs, sorted by group then hash.

    Groups are non-negative. When they fit in 32 bits (always, for rows of a shard), one
    sort of a packed key (the group in the high bits, the hash's high bits below) replaces
    a two-key ``lexsort``; equal packed keys with different hashes (a near-impossible
    coincidence of the hashes' high bits) fall back to the exact two-key sort.
    """
    n = len(groups)
    group_bits = max(int(groups.max()).bit_length(), 1) if n else 1
    if n and group_bits <= 32 and hashes.dtype == np.uint64 and int(groups.min()) >= 0:
        shift = np.uint64(64 - group_bits)
        key = (groups.astype(np.uint64) << shift) | (hashes >> np.uint64(group_bits))
        order = np.argsort(key, kind="stable")  # runs (old rows, new rows) merge in O(n)
        k, h = key[order], hashes[order]
        same = k[1:] == k[:-1]
        if not bool((same & (h[1:] != h[:-1])).any()):
            first = np.ones(n, dtype=bool)
            first[1:] = ~same
            return groups[order[first]], h[first]
    order = np.lexsort((hashes, groups))
    g, h = groups[order], hashes[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = (g[1:] != g[:-1]) | (h[1:] != h[:-1])
    return g[first], h[first]


def update_sketch(sk: ds.hll_sketch, hashes: np.ndarray) -> None:
    """Feed hashes (as signed 64-bit ints) to an HLL sketch; the loop runs in C (``map``)."""
    deque(map(sk.update, hashes.view(np.int64).tolist()), maxlen=0)


def _grow_sketch_rows(sketches: np.ndarray, flags: np.ndarray, capacity: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The per-row sketch objects and is-a-sketch flags, grown to at least ``capacity`` rows."""
    n = len(sketches)
    if capacity <= n:
        return sketches, flags
    size = max(capacity, 2 * n, 1024)
    grown = np.empty(size, dtype=object)
    grown[:n] = sketches
    grown_flags = np.zeros(size, dtype=bool)
    grown_flags[:n] = flags
    return grown, grown_flags


class DistinctColumn(RepColumn):
    """Columnar ``approx_distinct`` reps: per row a sorted set of hashes, or an HLL sketch.

    Folded hashes wait in a pending list; before a flush, an eviction or a snapshot they are
    merged into the rows they touch (sets by numpy union; rows past the limit become
    sketches). ``serialize`` writes set rows with numpy and sketch rows one by one.
    """

    def __init__(self, agg: ApproxDistinctAgg, state: dict | None = None) -> None:
        self.agg = agg
        self.sets = RaggedPool({"h": np.uint64})
        self.sketches = np.empty(0, dtype=object)
        self.is_sketch = np.zeros(0, dtype=bool)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        if state is not None:
            self.sets = RaggedPool.from_state({"h": np.uint64}, state["sets"])
            n = len(state["sets"]["counts"])
            self.sketches = np.empty(n, dtype=object)
            self.is_sketch = np.zeros(n, dtype=bool)
            for r, blob in state["sketches"].items():
                self.sketches[r] = ds.hll_sketch.deserialize(blob)
                self.is_sketch[r] = True

    def resize(self, capacity: int) -> None:
        self.sets.resize(capacity)
        self.sketches, self.is_sketch = _grow_sketch_rows(self.sketches, self.is_sketch, capacity)

    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        self._pending.append((np.asarray(rows, np.int64), key_hashes(values)))
        self._pending_n += len(rows)
        if self._pending_n >= PENDING_LIMIT:  # memory stays bounded between flushes
            self._settle()

    def _settle(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate([p[0] for p in self._pending])
        hashes = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_n = [], 0
        rows, hashes = unique_pairs(rows, hashes)
        is_sketch = self.is_sketch[rows]
        if is_sketch.any():
            self._feed_sketches(rows[is_sketch], hashes[is_sketch])
            rows, hashes = rows[~is_sketch], hashes[~is_sketch]
        if not len(rows):
            return
        uniq, inv = sorted_unique(rows)  # unique_pairs sorted them
        old, counts = self.sets.gather(uniq)
        g = np.concatenate((np.repeat(np.arange(len(uniq), dtype=np.int64), counts), inv))
        g, h = unique_pairs(g, np.concatenate((old["h"], hashes)))
        total = np.bincount(g, minlength=len(uniq))
        big = total > self.agg.exact_limit
        if big.any():
            bounds = np.searchsorted(g, np.arange(len(uniq) + 1))
            for j in np.flatnonzero(big).tolist():
                self.sketches[uniq[j]] = self.agg._sketch(h[bounds[j]:bounds[j + 1]])
            self.is_sketch[uniq[big]] = True
            total = np.where(big, 0, total)
            keep = ~big[g]
            g, h = g[keep], h[keep]
        self.sets.write(uniq, total, {"h": h})

    def _feed_sketches(self, rows: np.ndarray, hashes: np.ndarray) -> None:
        uniq, starts = np.unique(rows, return_index=True)
        bounds = np.append(starts, len(rows))
        for j, r in enumerate(uniq.tolist()):
            update_sketch(self.sketches[r], hashes[bounds[j]:bounds[j + 1]])

    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        self._settle()
        entries, k = self.sets.gather(rows)
        exact = ~self.is_sketch[rows]
        images = [bytes([_TAG_SKETCH]) + bytes(self.sketches[r].serialize_compact())
                  for r in rows[~exact].tolist()]
        image_len = np.zeros(len(rows), np.int64)
        image_len[~exact] = [len(img) for img in images]
        head = np.zeros(int(exact.sum()), dtype=_EXACT_HEAD_DTYPE)
        head["tag"] = _TAG_EXACT
        head["n"] = k[exact]
        size = np.where(exact, _EXACT_HEAD.size + 8 * k, image_len)
        blob = join_segments(len(rows), [
            (head, row_cuts(exact, _EXACT_HEAD.size)),
            (entries["h"].astype("<u8"), row_cuts(k, 8)),
            (np.frombuffer(b"".join(images), np.uint8), row_cuts(image_len)),
        ])
        return blob, size

    def keep(self, rows: np.ndarray) -> None:
        self._settle()
        rows = np.asarray(rows, np.int64)
        self.sets.keep(rows)
        self.sketches = self.sketches[rows]
        self.is_sketch = self.is_sketch[rows]

    def state(self, n: int) -> dict:
        self._settle()
        sketches = {r: bytes(self.sketches[r].serialize_compact())
                    for r in np.flatnonzero(self.is_sketch[:n]).tolist()}
        return {"sets": self.sets.state(n), "sketches": sketches}


class QuantileColumn(RepColumn):
    """Columnar ``approx_quantile`` state: exact values while a row has at most ``k``, then KLL.

    A KLL sketch holding at most ``k`` values has not compacted: it is those values, exactly.
    Such rows keep their values in a ``RaggedPool`` (insertion order) and ``serialize`` writes
    the KLL image DataSketches writes for them (a single-item image for one value; otherwise
    the one-level image with the values newest first) with numpy, for many rows at once. A
    row past ``k`` values becomes a real ``kll_doubles_sketch`` fed with its values in order,
    then with each settle's new values in one ``update(ndarray)`` call (the KLL batch entry
    point). Folded values wait in a pending list until a flush, an eviction or a snapshot.
    """

    def __init__(self, agg: ApproxQuantileAgg, state: dict | None = None) -> None:
        self.agg = agg
        self.values = RaggedPool({"v": np.float64})
        self.sketches = np.empty(0, dtype=object)
        self.is_sketch = np.zeros(0, dtype=bool)
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []
        self._pending_n = 0
        if state is not None:
            self.values = RaggedPool.from_state({"v": np.float64}, state["values"])
            n = len(state["values"]["counts"])
            self.sketches = np.empty(n, dtype=object)
            self.is_sketch = np.zeros(n, dtype=bool)
            for r, blob in state["sketches"].items():
                self.sketches[r] = agg.from_bytes(blob)
                self.is_sketch[r] = True

    def resize(self, capacity: int) -> None:
        self.values.resize(capacity)
        self.sketches, self.is_sketch = _grow_sketch_rows(self.sketches, self.is_sketch, capacity)

    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        self._pending.append((np.asarray(rows, np.int64),
                              np.asarray(plain_values(values), dtype=np.float64)))
        self._pending_n += len(rows)
        if self._pending_n >= PENDING_LIMIT:  # memory stays bounded between flushes
            self._settle()

    def _settle(self) -> None:
        if not self._pending:
            return
        rows = np.concatenate([p[0] for p in self._pending])
        vals = np.concatenate([p[1] for p in self._pending])
        self._pending, self._pending_n = [], 0
        order = stable_order(rows)  # per row, values stay in arrival order
        rows, vals = rows[order], vals[order]
        big = self.is_sketch[rows]
        if big.any():
            self._feed(rows[big], vals[big])
            rows, vals = rows[~big], vals[~big]
        if not len(rows):
            return
        uniq, inv = sorted_unique(rows)
        old, counts = self.values.gather(uniq)
        g = np.concatenate((np.repeat(np.arange(len(uniq), dtype=np.int64), counts), inv))
        v = np.concatenate((old["v"], vals))
        order = np.argsort(g, kind="stable")  # old values first, then the new, per row
        g, v = g[order], v[order]
        total = np.bincount(g, minlength=len(uniq))
        over = total > self.agg.k
        if over.any():
            bounds = np.searchsorted(g, np.arange(len(uniq) + 1))
            for j in np.flatnonzero(over).tolist():
                sk = ds.kll_doubles_sketch(self.agg.k)
                sk.update(v[bounds[j]:bounds[j + 1]])
                self.sketches[uniq[j]] = sk
            self.is_sketch[uniq[over]] = True
            keep = ~over[g]
            g, v = g[keep], v[keep]
            total = np.where(over, 0, total)
        self.values.write(uniq, total, {"v": v}, max_cap=self.agg.k)

    def _feed(self, rows: np.ndarray, vals: np.ndarray) -> None:
        uniq, starts = np.unique(rows, return_index=True)
        bounds = np.append(starts, len(rows)).tolist()
        for j, r in enumerate(uniq.tolist()):
            self.sketches[r].update(vals[bounds[j]:bounds[j + 1]])

    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        rows = np.asarray(rows, np.int64)
        self._settle()
        entries, n = self.values.gather(rows)
        blob, size = kll_images(entries["v"], n, self.agg.k)
        sketch_rows = np.flatnonzero(self.is_sketch[rows])
        if not len(sketch_rows):
            return blob, size
        images = {j: bytes(self.sketches[rows[j]].serialize()) for j in sketch_rows.tolist()}
        off = np.concatenate(([0], np.cumsum(size)))
        parts, last = [], 0
        for j, img in images.items():  # splice sketch images in at their rows
            parts.append(blob[off[last]:off[j]])
            parts.append(img)
            last = j + 1
        parts.append(blob[off[last]:])
        size = size.copy()
        size[sketch_rows] = [len(images[j]) for j in sketch_rows.tolist()]
        return b"".join(parts), size

    def keep(self, rows: np.ndarray) -> None:
        self._settle()
        rows = np.asarray(rows, np.int64)
        self.values.keep(rows)
        self.sketches = self.sketches[rows]
        self.is_sketch = self.is_sketch[rows]

    def state(self, n: int) -> dict:
        self._settle()
        sketches = {r: bytes(self.sketches[r].serialize())
                    for r in np.flatnonzero(self.is_sketch[:n]).tolist()}
        return {"values": self.values.state(n), "sketches": sketches}


_KLL_FAMILY = 15
_KLL_M = 8


def kll_images(values: np.ndarray, counts: np.ndarray, k: int) -> tuple[bytes, np.ndarray]:
    """DataSketches KLL (doubles) images of rows holding ``counts[i]`` <= k exact values each.

    ``values`` holds each row's values in insertion order, row after row. The image of a row
    is what ``kll_doubles_sketch(k)`` serializes after updating with those values: empty (8
    bytes), single item (16 bytes), or one level (20-byte preamble, the level offset, min,
    max, then the values newest first).
    """
    counts = np.asarray(counts, np.int64)
    rows = len(counts)
    size = np.where(counts == 0, 8, np.where(counts == 1, 16, 40 + 8 * counts))
    off = np.cumsum(size) - size
    out = np.zeros(int(size.sum()), np.uint8)
    kind = np.where(counts == 0, 0, np.where(counts == 1, 1, 2))
    pre = np.array([[2, 1, _KLL_FAMILY, 1], [2, 2, _KLL_FAMILY, 4], [5, 1, _KLL_FAMILY, 0]],
                   np.uint8)  # preamble ints, serial version, family, flags (empty, single)
    out[off[:, None] + np.arange(4)] = pre[kind]
    out[off[:, None] + np.array([4, 5])] = np.frombuffer(np.uint16(k).tobytes(), np.uint8)
    out[off + 6] = _KLL_M
    g = np.repeat(np.arange(rows, dtype=np.int64), counts)
    pos = np.arange(len(g)) - np.repeat(np.cumsum(counts) - counts, counts)
    single = np.flatnonzero(counts == 1)
    if len(single):
        first = (np.cumsum(counts) - counts)[single]
        put_bytes(out, off[single] + 8, values[first].astype("<f8"))
    multi = np.flatnonzero(counts >= 2)
    if len(multi):
        m_off, m_n = off[multi], counts[multi]
        put_bytes(out, m_off + 8, m_n.astype("<u8"))
        put_bytes(out, m_off + 16, np.full(len(multi), k, "<u2"))
        out[m_off + 18] = 1  # levels
        put_bytes(out, m_off + 20, (k - m_n).astype("<u4"))
        is_multi = counts[g] >= 2
        mg, mv, mp = g[is_multi], values[is_multi], pos[is_multi]
        lo = np.full(rows, np.inf)
        hi = np.full(rows, -np.inf)
        np.minimum.at(lo, mg, mv)
        np.maximum.at(hi, mg, mv)
        put_bytes(out, m_off + 24, lo[multi].astype("<f8"))
        put_bytes(out, m_off + 32, hi[multi].astype("<f8"))
        newest_first = counts[mg] - 1 - mp
        put_bytes(out, off[mg] + 40 + 8 * newest_first, mv.astype("<f8"))
    return out.tobytes(), size

