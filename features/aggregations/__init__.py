"""Aggregations: one small class each, built from a ``FeatureSpec`` by ``build_aggregation``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from features.aggregations.base import Aggregation
from features.aggregations.last_n import LastNAgg
from features.aggregations.numeric import CountAgg, MaxAgg, MeanAgg, MinAgg, SumAgg
from features.aggregations.sketches import ApproxDistinctAgg, ApproxQuantileAgg

if TYPE_CHECKING:
    from features.spec import FeatureSpec

__all__ = [
    "Aggregation",
    "ApproxDistinctAgg",
    "ApproxQuantileAgg",
    "CountAgg",
    "LastNAgg",
    "MaxAgg",
    "MeanAgg",
    "MinAgg",
    "SumAgg",
    "build_aggregation",
    "make_aggregation",
]


def make_aggregation(kind: str, params: dict | None = None) -> Aggregation:
    """Return the aggregation ``kind`` with ``params`` (``n``, ``lg_k``, ``k``, ``quantile``).

    Raises:
        ValueError: unknown kind or bad parameter.
    """
    p = dict(params or {})
    if kind == "count":
        return CountAgg()
    if kind == "sum":
        return SumAgg()
    if kind == "mean":
        return MeanAgg()
    if kind == "min":
        return MinAgg()
    if kind == "max":
        return MaxAgg()
    if kind == "last_n":
        return LastNAgg(int(p.get("n", 10)))
    if kind == "approx_distinct":
        return ApproxDistinctAgg(int(p.get("lg_k", 12)))
    if kind == "approx_quantile":
        return ApproxQuantileAgg(int(p.get("k", 200)), float(p.get("quantile", 0.5)))
    raise ValueError(
        f"unknown aggregation {kind!r}; expected one of count, sum, mean, min, max, last_n, "
        "approx_distinct, approx_quantile"
    )


def build_aggregation(spec: FeatureSpec) -> Aggregation:
    """Return the aggregation a feature spec declares."""
    return make_aggregation(spec.aggregation, dict(spec.params))
