"""The aggregation algebra: ``map(event) -> rep``, ``combine(rep, rep) -> rep``, ``finalize(rep)``.

Every aggregation is one small class with two faces:

* the scalar algebra (``identity``, ``map``, ``combine``, ``finalize``, ``to_bytes`` /
  ``from_bytes``): obviously correct, used by tests and as the reference;
* the batch face (``group_reduce``, ``unpack``, ``reduce_rows``, ``combine_many``): numpy
  paths used by the streaming flow and the read path, tested against the scalar face.

``combine`` is associative and commutative, and ``identity`` is its neutral element, so a
window's value can be assembled from any non-overlapping blocks that cover it.

Fixed-width aggregations (count, sum, mean, min, max) declare ``rep_dtype``: their reps of
many blocks decode as one numpy structured array with ``np.frombuffer``, no Python object per
block. Variable-width ones (last_n, sketches) set ``rep_dtype = None``.

The streaming face is ``new_column``: a ``RepColumn`` keeps the reps of many open blocks
columnar (one row per block) and folds batches of events into them; its ``serialize`` gives
exactly the bytes ``to_bytes`` gives for the same rep, so every reader decodes either.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np

Rep = Any
Value = Any

PENDING_LIMIT = 1_000_000
"""Folded entries a columnar rep keeps pending before merging them into its rows."""


class Aggregation(ABC):
    """Base class of every aggregation. Subclasses are immutable after construction."""

    kind: ClassVar[str]
    rep_dtype: ClassVar[np.dtype | None] = None
    needs_value: ClassVar[bool] = True
    #: layout of the rep bytes; part of the feature's version, so a change re-keys its blocks
    rep_format: ClassVar[int] = 1

    # ---- scalar algebra -------------------------------------------------------------
    @abstractmethod
    def identity(self) -> Rep:
        """Return the neutral rep: ``combine(identity(), r) == r``."""

    @abstractmethod
    def map(self, value: Any, ts: int) -> Rep:
        """Return the rep of one event with ``value`` at time ``ts``."""

    @abstractmethod
    def combine(self, a: Rep, b: Rep) -> Rep:
        """Merge two reps (associative and commutative); inputs are not modified."""

    @abstractmethod
    def finalize(self, rep: Rep) -> Value:
        """Return the feature value of a rep (``None`` when the rep holds no data)."""

    @abstractmethod
    def to_bytes(self, rep: Rep) -> bytes:
        """Serialize one rep compactly."""

    @abstractmethod
    def from_bytes(self, data: bytes | memoryview) -> Rep:
        """Inverse of ``to_bytes``; raises ``RepDecodeError`` on malformed input."""

    # ---- batch face -----------------------------------------------------------------
    def group_reduce(
        self, group_ids: np.ndarray, n_groups: int, values: np.ndarray | None, ts: np.ndarray
    ) -> Any:
        """Return one rep per group: the combine of ``map`` over the events of that group.

        The result has the type ``unpack`` returns: a structured array for fixed-width
        aggregations, a list of reps otherwise.

        Args:
            group_ids: int array, the group (0..n_groups-1) of each event.
            values: the value of each event (None for aggregations without a value).
            ts: int64 event times.
        """
        reps = [self.identity() for _ in range(n_groups)]
        vals = values if values is not None else [None] * len(group_ids)
        for g, v, t in zip(group_ids.tolist(), list(vals), ts.tolist()):
            reps[g] = self.combine(reps[g], self.map(v, t))
        return reps

    def group_combine(self, group_ids: np.ndarray, n_groups: int, reps: Any) -> Any:
        """Combine the reps of each group (roll-ups); same types as ``group_reduce``."""
        buckets: list[list[Rep]] = [[] for _ in range(n_groups)]
        for g, r in zip(group_ids.tolist(), reps):
            buckets[g].append(r)
        return [self.combine_many(b) for b in buckets]

    def combine_many(self, reps: Sequence[Rep]) -> Rep:
        """Combine a sequence of reps (identity when empty)."""
        out = self.identity()
        for r in reps:
            out = self.combine(out, r)
        return out

    def unpack(self, blob: bytes | memoryview, offsets: np.ndarray) -> Any:
        """Decode the reps stored back to back in ``blob`` (row i is ``offsets[i]:offsets[i+1]``).

        Fixed-width aggregations return a structured numpy array (zero copy); others a
        list of reps.
        """
        mv = memoryview(blob)
        return [self.from_bytes(mv[int(a):int(b)]) for a, b in pairwise(offsets.tolist())]

    def reduce_rows(self, unpacked: Any, rows: np.ndarray) -> Rep:
        """Combine the reps at ``rows`` of an ``unpack`` result."""
        return self.combine_many([unpacked[int(i)] for i in rows])

    def pack(self, reps: Sequence[Rep]) -> tuple[bytes, np.ndarray]:
        """Serialize reps back to back; return (blob, offsets) with ``len(reps)+1`` offsets."""
        parts = [self.to_bytes(r) for r in reps]
        offsets = np.zeros(len(parts) + 1, dtype=np.uint32)
        if parts:
            np.cumsum([len(p) for p in parts], out=offsets[1:])
        return b"".join(parts), offsets

    def new_column(self, state: Any = None) -> RepColumn:
        """Return an empty ``RepColumn`` for this aggregation, or one resumed from ``state``.

        The default keeps one live rep object per row (the scalar algebra); aggregations on
        the hot path override it with a columnar one.
        """
        if self.rep_dtype is not None:
            return FixedColumn(self, state)
        return ObjectColumn(self, state)

    def equal(self, a: Rep, b: Rep) -> bool:
        """Whether two reps are the same aggregate (exact aggregations compare exactly)."""
        return self.finalize(a) == self.finalize(b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class RepColumn(ABC):
    """The reps of one feature's open blocks, one per row: the streaming state of an aggregation.

    Order of calls: ``resize`` before rows beyond the current capacity are used; ``fold`` any
    number of times; ``serialize`` for the rows a flush writes; ``keep`` when blocks are evicted;
    ``state`` for a snapshot (plain, picklable data that ``Aggregation.new_column`` resumes).
    """

    @abstractmethod
    def resize(self, capacity: int) -> None:
        """Make rows ``0..capacity-1`` usable (new rows hold the identity)."""

    @abstractmethod
    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        """Fold event ``i`` (``values[i]`` at ``ts[i]``) into the block at row ``rows[i]``.

        ``values`` is the event column restricted to these events (a numpy array or a
        ``DictColumn``), or None for aggregations without a value.
        """

    @abstractmethod
    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        """Return ``(blob, lengths)``: the ``to_bytes`` of each row's rep, back to back."""

    @abstractmethod
    def keep(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (ascending); row ``rows[j]`` becomes row ``j``."""

    @abstractmethod
    def state(self, n: int) -> Any:
        """Return the reps of rows ``0..n-1`` as plain data for a snapshot."""


def plain_values(values: Any) -> Any:
    """A value column as a plain array (dictionary strings decoded to an object array)."""
    if values is None or isinstance(values, np.ndarray):
        return values
    return values.values()


class FixedColumn(RepColumn):
    """Fixed-width reps in one structured array (count, sum, mean, min, max)."""

    def __init__(self, agg: Aggregation, state: np.ndarray | None = None) -> None:
        self.agg = agg
        self.reps = (np.asarray(state, dtype=agg.rep_dtype).copy() if state is not None
                     else agg.identity_array(0))

    def resize(self, capacity: int) -> None:
        n = len(self.reps)
        if capacity > n:
            grown = self.agg.identity_array(max(capacity, 2 * n, 1024))
            grown[:n] = self.reps
            self.reps = grown

    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        accumulate = getattr(self.agg, "accumulate", None)
        if accumulate is not None:  # in place, in event order, no grouping sort
            accumulate(self.reps, rows, plain_values(values))
            return
        uniq, inv = np.unique(rows, return_inverse=True)
        batch = self.agg.group_reduce(inv.astype(np.int64), len(uniq), plain_values(values), ts)
        self.reps[uniq] = self.agg.combine_arrays(self.reps[uniq], batch)

    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        size = self.agg.rep_dtype.itemsize
        return self.reps[rows].tobytes(), np.full(len(rows), size, np.int64)

    def keep(self, rows: np.ndarray) -> None:
        self.reps = self.reps[rows]

    def state(self, n: int) -> np.ndarray:
        return self.reps[:n].copy()


class ObjectColumn(RepColumn):
    """One live rep object per row (the scalar algebra); bytes cached until the rep changes."""

    def __init__(self, agg: Aggregation, state: list[bytes] | None = None) -> None:
        self.agg = agg
        stored = list(state or [])
        self.live: list[Any] = [agg.from_bytes(b) for b in stored]
        self.ser: list[bytes | None] = list(stored)

    def resize(self, capacity: int) -> None:
        if capacity > len(self.live):
            extra = max(capacity, 2 * len(self.live), 1024) - len(self.live)
            self.live.extend([None] * extra)
            self.ser.extend([None] * extra)

    def fold(self, rows: np.ndarray, values: Any, ts: np.ndarray) -> None:
        uniq, inv = np.unique(rows, return_inverse=True)
        batch = self.agg.group_reduce(inv.astype(np.int64), len(uniq), plain_values(values), ts)
        live, ser, combine = self.live, self.ser, self.agg.combine
        for r, rep in zip(uniq.tolist(), batch):
            prev = live[r]
            live[r] = rep if prev is None else combine(prev, rep)
            ser[r] = None

    def serialize(self, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        parts = self._bytes(rows.tolist())
        return b"".join(parts), np.fromiter(map(len, parts), np.int64, len(parts))

    def _bytes(self, rows: list[int]) -> list[bytes]:
        live, ser, to_bytes = self.live, self.ser, self.agg.to_bytes
        out = []
        for r in rows:
            b = ser[r]
            if b is None:
                b = ser[r] = to_bytes(live[r])
            out.append(b)
        return out

    def keep(self, rows: np.ndarray) -> None:
        idx = rows.tolist()
        self.live = [self.live[r] for r in idx]
        self.ser = [self.ser[r] for r in idx]

    def state(self, n: int) -> list[bytes]:
        return self._bytes(list(range(n)))
