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
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from itertools import pairwise
from typing import Any, ClassVar

import numpy as np

Rep = Any
Value = Any


class Aggregation(ABC):
    """Base class of every aggregation. Subclasses are immutable after construction."""

    kind: ClassVar[str]
    rep_dtype: ClassVar[np.dtype | None] = None
    needs_value: ClassVar[bool] = True

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

    def equal(self, a: Rep, b: Rep) -> bool:
        """Whether two reps are the same aggregate (exact aggregations compare exactly)."""
        return self.finalize(a) == self.finalize(b)

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
