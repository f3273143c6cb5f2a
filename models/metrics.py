"""Offline evaluation metrics (numpy): AUC, log loss, normalized cross entropy, recall@k, nDCG@k.

All return ``float('nan')`` when undefined (e.g. AUC with a single class), so a metrics
dict is always complete and JSON-ready once NaNs are turned into nulls.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

__all__ = [
    "auc",
    "grouped_ndcg_at_k",
    "log_loss",
    "ndcg_at_k",
    "normalized_cross_entropy",
    "recall_at_k",
]

_EPS = 1e-7


def auc(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Return the ROC AUC: P(score of a positive > score of a negative), ties counted half.

    Computed from average ranks (Mann-Whitney U); NaN when only one class is present.
    """
    y = np.asarray(labels, dtype=np.float64) > 0.5
    s = np.asarray(scores, dtype=np.float64)
    n_pos = int(y.sum())
    n_neg = len(y) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average rank (1-based) of each run of tied scores
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_s)) + 1]
    ends = np.r_[starts[1:], len(s)]
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def log_loss(labels: Sequence[float], probs: Sequence[float]) -> float:
    """Return the mean binary cross entropy (natural log), probabilities clipped to [1e-7, 1-1e-7]."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(probs, dtype=np.float64), _EPS, 1 - _EPS)
    if len(y) == 0:
        return float("nan")
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_cross_entropy(labels: Sequence[float], probs: Sequence[float],
                             base_rate: float | None = None) -> float:
    """Return log loss / log loss of always predicting the base rate (lower is better, 1 = no skill).

    ``base_rate`` defaults to the mean label of ``labels``; pass the training rate to judge
    calibration too. NaN when the base rate is 0 or 1.
    """
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0:
        return float("nan")
    p = float(np.mean(y)) if base_rate is None else float(base_rate)
    if p <= 0 or p >= 1:
        return float("nan")
    base = log_loss(y, np.full(len(y), p))
    return log_loss(y, probs) / base if base > 0 else float("nan")


def recall_at_k(relevant: Iterable[Iterable[Any]], retrieved: Iterable[Sequence[Any]],
                k: int) -> float:
    """Return the mean over queries of ``|top-k retrieved ∩ relevant| / |relevant|``.

    Queries with no relevant items are skipped; NaN when none is left.
    """
    values = []
    for rel, got in zip(relevant, retrieved):
        rel_set = set(rel)
        if not rel_set:
            continue
        values.append(len(rel_set.intersection(list(got)[:k])) / len(rel_set))
    return float(np.mean(values)) if values else float("nan")


def ndcg_at_k(gains: Sequence[float], scores: Sequence[float], k: int) -> float:
    """Return nDCG@k of one list: DCG of the top-k by score over DCG of the ideal order.

    ``DCG = sum(gain_i / log2(i + 2))`` over ranks i = 0..k-1; ties in score keep input order.
    NaN when every gain is 0.
    """
    g = np.asarray(gains, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    discount = 1.0 / np.log2(np.arange(2, min(k, len(g)) + 2))
    ideal = float((np.sort(g)[::-1][:k] * discount).sum())
    if ideal <= 0:
        return float("nan")
    order = np.argsort(-s, kind="stable")[:k]
    return float((g[order] * discount).sum()) / ideal


def grouped_ndcg_at_k(groups: Sequence[Any], gains: Sequence[float], scores: Sequence[float],
                      k: int) -> float:
    """Return the mean nDCG@k over groups (requests) that have at least one positive gain."""
    keys = np.asarray(groups, dtype=object)
    g = np.asarray(gains, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    by: dict[Any, list[int]] = {}
    for i, key in enumerate(keys.tolist()):
        by.setdefault(key, []).append(i)
    values = []
    for idx in by.values():
        v = ndcg_at_k(g[idx], s[idx], k)
        if not np.isnan(v):
            values.append(v)
    return float(np.mean(values)) if values else float("nan")


def clean(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``metrics`` with NaN/inf floats replaced by None (JSON-safe), nested dicts too."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, Mapping):
            out[k] = clean(v)
        elif isinstance(v, (float, np.floating)):
            out[k] = float(v) if np.isfinite(v) else None
        elif isinstance(v, np.integer):
            out[k] = int(v)
        else:
            out[k] = v
    return out
