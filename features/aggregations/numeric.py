"""Fixed-width aggregations: count, sum, mean, min, max.

Reps are small tuples in the scalar algebra and rows of a numpy structured dtype in the
batch face, so thousands of block reps decode with one ``np.frombuffer``.

Sums are float64: exact for integer-valued inputs whose partial sums stay below 2**53
(counts, milliseconds), otherwise equal up to float rounding, which depends on the order
of additions.
"""

from __future__ import annotations

import math
import struct
from typing import Any, ClassVar

import numpy as np

from features.aggregations.base import Aggregation
from features.errors import RepDecodeError


class _Fixed(Aggregation):
    """Shared plumbing of fixed-width reps: ``to_bytes`` is the packed structured row."""

    _struct: ClassVar[struct.Struct]

    def to_bytes(self, rep: Any) -> bytes:
        return self._struct.pack(*self._as_tuple(rep))

    def from_bytes(self, data: bytes | memoryview) -> Any:
        if len(data) != self._struct.size:
            raise RepDecodeError(
                f"{self.kind} rep must be {self._struct.size} bytes, got {len(data)}"
            )
        return self._from_tuple(self._struct.unpack(data))

    def _as_tuple(self, rep: Any) -> tuple:
        return (rep,)

    def _from_tuple(self, t: tuple) -> Any:
        return t[0]

    def unpack(self, blob: bytes | memoryview, offsets: np.ndarray) -> np.ndarray:
        n = len(offsets) - 1
        if n == 0:
            return np.zeros(0, dtype=self.rep_dtype)
        start = int(offsets[0])
        return np.frombuffer(blob, dtype=self.rep_dtype, count=n, offset=start)

    def pack(self, reps: Any) -> tuple[bytes, np.ndarray]:
        arr = self.to_array(reps)
        size = self.rep_dtype.itemsize
        return arr.tobytes(), np.arange(len(arr) + 1, dtype=np.uint32) * size

    def group_combine(self, group_ids: np.ndarray, n_groups: int, reps: np.ndarray) -> np.ndarray:
        """Combine the reps of each group (roll-ups): one rep per group, vectorized."""
        out = self.identity_array(n_groups)
        if isinstance(self, _Extremum):
            field = self.rep_dtype.names[0]
            col = out[field]
            self._ufunc.at(col, group_ids, reps[field])
            out[field] = col
            return out
        for field in self.rep_dtype.names:
            out[field] = np.bincount(group_ids, weights=reps[field], minlength=n_groups).astype(
                self.rep_dtype[field])
        return out

    def identity_array(self, n: int) -> np.ndarray:
        """Return ``n`` identity reps as a structured array (vectorized)."""
        out = np.zeros(n, dtype=self.rep_dtype)
        ident = self._as_tuple(self.identity())
        for name, value in zip(self.rep_dtype.names, ident):
            if value:
                out[name] = value
        return out

    def to_array(self, reps: Any) -> np.ndarray:
        """Return reps (list of scalar reps or a structured array) as a structured array."""
        if isinstance(reps, np.ndarray):
            return reps.astype(self.rep_dtype, copy=False)
        return np.array([self._as_tuple(r) for r in reps], dtype=self.rep_dtype)

    def from_array(self, arr: np.ndarray) -> list[Any]:
        """Return the scalar reps of a structured array."""
        return [self._from_tuple(tuple(row)) for row in arr.tolist()]


class CountAgg(_Fixed):
    """Number of events. Rep: int64 count."""

    kind = "count"
    needs_value = False
    rep_dtype = np.dtype([("n", "<i8")])
    _struct = struct.Struct("<q")

    def identity(self) -> int:
        return 0

    def map(self, value: Any, ts: int) -> int:
        return 1

    def combine(self, a: int, b: int) -> int:
        return a + b

    def finalize(self, rep: int) -> float:
        return float(rep)

    def _from_tuple(self, t: tuple) -> int:
        return int(t[0])

    def group_reduce(self, group_ids, n_groups, values, ts):
        counts = np.bincount(group_ids, minlength=n_groups).astype(np.int64)
        return _wrap(counts, self.rep_dtype)

    def reduce_rows(self, unpacked: np.ndarray, rows: np.ndarray) -> int:
        return int(unpacked["n"][rows].sum())

    def combine_arrays(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Elementwise combine of two structured arrays of equal length."""
        return _wrap(a["n"] + b["n"], self.rep_dtype)

    def accumulate(self, reps: np.ndarray, rows: np.ndarray, values: Any) -> None:
        """Fold event i into ``reps[rows[i]]`` in place, in event order (``ufunc.at``)."""
        col = reps["n"]
        np.add.at(col, rows, 1)
        reps["n"] = col


class SumAgg(_Fixed):
    """Sum of a numeric field. Rep: float64 sum."""

    kind = "sum"
    rep_dtype = np.dtype([("s", "<f8")])
    _struct = struct.Struct("<d")

    def identity(self) -> float:
        return 0.0

    def map(self, value: Any, ts: int) -> float:
        return float(value)

    def combine(self, a: float, b: float) -> float:
        return a + b

    def finalize(self, rep: float) -> float:
        return float(rep)

    def group_reduce(self, group_ids, n_groups, values, ts):
        sums = np.bincount(group_ids, weights=np.asarray(values, dtype=np.float64),
                           minlength=n_groups)
        return _wrap(sums, self.rep_dtype)

    def reduce_rows(self, unpacked: np.ndarray, rows: np.ndarray) -> float:
        return float(unpacked["s"][rows].sum())

    def combine_arrays(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return _wrap(a["s"] + b["s"], self.rep_dtype)

    def accumulate(self, reps: np.ndarray, rows: np.ndarray, values: Any) -> None:
        col = reps["s"]
        np.add.at(col, rows, np.asarray(values, dtype=np.float64))
        reps["s"] = col


class MeanAgg(_Fixed):
    """Mean of a numeric field. Rep: (float64 sum, int64 count); ``None`` when empty."""

    kind = "mean"
    rep_dtype = np.dtype([("s", "<f8"), ("n", "<i8")])
    _struct = struct.Struct("<dq")

    def identity(self) -> tuple[float, int]:
        return (0.0, 0)

    def map(self, value: Any, ts: int) -> tuple[float, int]:
        return (float(value), 1)

    def combine(self, a, b):
        return (a[0] + b[0], a[1] + b[1])

    def finalize(self, rep) -> float | None:
        return rep[0] / rep[1] if rep[1] else None

    def _as_tuple(self, rep):
        return (float(rep[0]), int(rep[1]))

    def _from_tuple(self, t):
        return (float(t[0]), int(t[1]))

    def group_reduce(self, group_ids, n_groups, values, ts):
        out = np.zeros(n_groups, dtype=self.rep_dtype)
        out["s"] = np.bincount(group_ids, weights=np.asarray(values, dtype=np.float64),
                               minlength=n_groups)
        out["n"] = np.bincount(group_ids, minlength=n_groups)
        return out

    def reduce_rows(self, unpacked, rows):
        return (float(unpacked["s"][rows].sum()), int(unpacked["n"][rows].sum()))

    def combine_arrays(self, a, b):
        out = np.zeros(len(a), dtype=self.rep_dtype)
        out["s"] = a["s"] + b["s"]
        out["n"] = a["n"] + b["n"]
        return out

    def accumulate(self, reps: np.ndarray, rows: np.ndarray, values: Any) -> None:
        s, n = reps["s"], reps["n"]
        np.add.at(s, rows, np.asarray(values, dtype=np.float64))
        np.add.at(n, rows, 1)
        reps["s"], reps["n"] = s, n


class _Extremum(_Fixed):
    """Min or max of a numeric field. Rep: float64 with ±inf as identity."""

    rep_dtype = np.dtype([("v", "<f8")])
    _struct = struct.Struct("<d")
    _empty: ClassVar[float]
    _ufunc: ClassVar[np.ufunc]

    def identity(self) -> float:
        return self._empty

    def map(self, value: Any, ts: int) -> float:
        return float(value)

    def finalize(self, rep: float) -> float | None:
        return None if rep == self._empty else float(rep)

    def group_reduce(self, group_ids, n_groups, values, ts):
        out = np.full(n_groups, self._empty, dtype=np.float64)
        self._ufunc.at(out, group_ids, np.asarray(values, dtype=np.float64))
        return _wrap(out, self.rep_dtype)

    def reduce_rows(self, unpacked, rows):
        if len(rows) == 0:
            return self._empty
        return float(self._ufunc.reduce(unpacked["v"][rows]))

    def combine_arrays(self, a, b):
        return _wrap(self._ufunc(a["v"], b["v"]), self.rep_dtype)

    def accumulate(self, reps: np.ndarray, rows: np.ndarray, values: Any) -> None:
        col = reps["v"]
        self._ufunc.at(col, rows, np.asarray(values, dtype=np.float64))
        reps["v"] = col


class MinAgg(_Extremum):
    """Minimum of a numeric field."""

    kind = "min"
    _empty = math.inf
    _ufunc = np.minimum

    def combine(self, a: float, b: float) -> float:
        return min(a, b)


class MaxAgg(_Extremum):
    """Maximum of a numeric field."""

    kind = "max"
    _empty = -math.inf
    _ufunc = np.maximum

    def combine(self, a: float, b: float) -> float:
        return max(a, b)


def _wrap(column: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Return a one-field structured array holding ``column``."""
    out = np.empty(len(column), dtype=dtype)
    out[dtype.names[0]] = column
    return out


def reduce_ranges(
    agg: _Fixed,
    unpacked: np.ndarray,
    lo: np.ndarray,
    hi: np.ndarray,
    prefix: dict[str, np.ndarray] | None = None,
) -> np.ndarray:
    """Combine, for each i, the reps at rows ``lo[i]:hi[i]`` (empty ranges give the identity).

    Vectorized over all ranges: prefix sums for count/sum/mean (pass ``prefix`` from
    ``prefix_sums`` to reuse them across calls), ``reduceat`` for min/max.
    """
    lo = np.asarray(lo, dtype=np.int64)
    hi = np.asarray(hi, dtype=np.int64)
    out = np.zeros(len(lo), dtype=agg.rep_dtype)
    if isinstance(agg, _Extremum):
        field = "v"
        col = unpacked[field]
        res = np.full(len(lo), agg._empty, dtype=np.float64)
        nonempty = hi > lo
        if nonempty.any() and len(col):
            idx = np.flatnonzero(nonempty)
            # reduceat over [lo, next lo) ranges: build cut points lo,hi interleaved.
            cuts = np.empty(2 * len(idx), dtype=np.int64)
            cuts[0::2] = lo[idx]
            cuts[1::2] = hi[idx]  # may equal len(col): points at the appended identity
            vals = agg._ufunc.reduceat(np.append(col, agg._empty), cuts)
            res[idx] = vals[0:2 * len(idx):2]
        out[field] = res
        return out
    sums = prefix if prefix is not None else prefix_sums(unpacked)
    for field in agg.rep_dtype.names:
        out[field] = sums[field][hi] - sums[field][lo]
    return out


def prefix_sums(unpacked: np.ndarray) -> dict[str, np.ndarray]:
    """Return, per field, the prefix sums ``p`` with ``p[i] = sum(col[:i])`` (length n + 1)."""
    out = {}
    for field in unpacked.dtype.names:
        col = unpacked[field]
        p = np.zeros(len(col) + 1, dtype=col.dtype)
        np.cumsum(col, out=p[1:])
        out[field] = p
    return out
