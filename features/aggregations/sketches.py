"""Approximate aggregations on Apache DataSketches.

* ``approx_distinct``: HyperLogLog (``hll_sketch``), merged with ``hll_union``. Relative
  standard error about ``1.04 / sqrt(2**lg_k)`` (1.6% at lg_k=12); exact while small
  (sparse mode). Merging is exactly associative and commutative on the sketch registers.
* ``approx_quantile``: KLL (``kll_doubles_sketch``). Normalized rank error about 1.65% at
  k=200. Exact while a sketch holds fewer than k values; above that its compaction is
  randomized, so combine is associative and commutative within the rank error bound, not
  bit for bit.
"""

from __future__ import annotations

from typing import Any

import datasketches as ds

from features.aggregations.base import Aggregation
from features.errors import RepDecodeError

_HLL_TYPE = ds.tgt_hll_type.HLL_4


class ApproxDistinctAgg(Aggregation):
    """Approximate number of distinct values of a field."""

    kind = "approx_distinct"

    def __init__(self, lg_k: int = 12) -> None:
        if not 4 <= lg_k <= 21:
            raise ValueError(f"approx_distinct needs 4 <= lg_k <= 21, got {lg_k}")
        self.lg_k = int(lg_k)

    def identity(self) -> ds.hll_sketch:
        return ds.hll_sketch(self.lg_k, _HLL_TYPE)

    def map(self, value: Any, ts: int) -> ds.hll_sketch:
        sk = ds.hll_sketch(self.lg_k, _HLL_TYPE)
        sk.update(_key(value))
        return sk

    def combine(self, a: ds.hll_sketch, b: ds.hll_sketch) -> ds.hll_sketch:
        union = ds.hll_union(self.lg_k)
        union.update(a)
        union.update(b)
        return union.get_result(_HLL_TYPE)

    def combine_many(self, reps) -> ds.hll_sketch:
        union = ds.hll_union(self.lg_k)
        for r in reps:
            union.update(r)
        return union.get_result(_HLL_TYPE)

    def finalize(self, rep: ds.hll_sketch) -> float:
        return float(round(rep.get_estimate()))

    def group_reduce(self, group_ids, n_groups, values, ts):
        reps = [ds.hll_sketch(self.lg_k, _HLL_TYPE) for _ in range(n_groups)]
        vals = values.tolist() if hasattr(values, "tolist") else list(values)
        for g, v in zip(group_ids.tolist(), vals):
            reps[g].update(_key(v))
        return reps

    def to_bytes(self, rep: ds.hll_sketch) -> bytes:
        return bytes(rep.serialize_compact())

    def from_bytes(self, data: bytes | memoryview) -> ds.hll_sketch:
        try:
            return ds.hll_sketch.deserialize(bytes(data))
        except Exception as exc:  # the binding raises RuntimeError/ValueError variants
            raise RepDecodeError(f"approx_distinct rep is not an HLL sketch: {exc}") from exc

    def equal(self, a, b) -> bool:
        return self.to_bytes(a) == self.to_bytes(b) or a.get_estimate() == b.get_estimate()

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
        for g, v in zip(group_ids.tolist(), values.tolist()):
            reps[g].update(float(v))
        return reps

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
