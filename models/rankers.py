"""Rankers: a tiny L1 over a few dense features and a DCN-v2 L2 with one head per task.

Both return probabilities from ``forward`` (what is exported and served) and logits from
``logits`` (what training uses, with ``BCEWithLogitsLoss``).

L1 inputs: ``dense`` float32 ``[n, d]``; output ``score`` float32 ``[n]``.

L2 inputs: ``dense`` float32 ``[n, d]``, ``ids`` int64 ``[n, c]`` (hashed categorical
fields), ``seq`` int64 ``[n, L]`` (hashed recent item ids, 0 = padding); output
``probs`` float32 ``[n, T]``, one column per task in ``tasks`` order. The sequence is
pooled by its mean and by attention with the candidate item's embedding as the query
(the sequence shares the item-id embedding table when ``item_field`` names a field).
:func:`combine_scores` turns the per-task probabilities into one ranking score.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from models.features import FeatureSchemaError
from models.towers import masked_attention, masked_mean, mlp

__all__ = ["DEFAULT_TASK_WEIGHTS", "CrossLayer", "L1Ranker", "L2Ranker", "combine_scores"]

DEFAULT_TASK_WEIGHTS: dict[str, float] = {
    "click": 1.0, "like": 2.0, "share": 4.0, "save": 3.0, "hide": -4.0,
}
"""Default value of each engagement in the combined L2 score (hides count against)."""


class L1Ranker(nn.Module):
    """Logistic regression (``hidden=0``) or a one-hidden-layer MLP over dense features."""

    def __init__(self, *, n_dense: int, hidden: int = 16):
        super().__init__()
        self.net = nn.Linear(n_dense, 1) if hidden == 0 else mlp([n_dense, hidden, 1])

    def logits(self, dense: torch.Tensor) -> torch.Tensor:
        """Return logits ``[n]``."""
        return self.net(dense).squeeze(-1)

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        """Return probabilities ``[n]``."""
        return torch.sigmoid(self.logits(dense))


class CrossLayer(nn.Module):
    """DCN-v2 full-rank cross: ``x_{l+1} = x0 * (W x_l + b) + x_l``."""

    def __init__(self, width: int):
        super().__init__()
        self.linear = nn.Linear(width, width)
        nn.init.zeros_(self.linear.bias)
        nn.init.normal_(self.linear.weight, std=0.01)

    def forward(self, x0: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply one cross layer."""
        return x0 * self.linear(x) + x


class L2Ranker(nn.Module):
    """DCN-v2 (cross layers in parallel with a deep MLP) with one logit head per task.

    Args:
        n_dense: dense inputs.
        id_buckets: bucket count of each categorical field, in input order.
        seq_buckets: bucket count of the sequence ids.
        tasks: task names, the output columns in order.
        item_field: index of the item-id field among the categorical ones (its embedding
            is shared with the sequence and is the attention query), or None.
    """

    def __init__(self, *, n_dense: int, id_buckets: Sequence[int], seq_buckets: int,
                 tasks: Sequence[str], item_field: int | None = None, emb_dim: int = 8,
                 n_cross: int = 2, deep: Sequence[int] = (64, 32)):
        super().__init__()
        if not tasks:
            raise FeatureSchemaError("L2Ranker needs at least one task; got none")
        self.tasks = list(tasks)
        share = item_field is not None and id_buckets[item_field] == seq_buckets
        self.item_field = item_field
        self.embeddings = nn.ModuleList(
            nn.Embedding(b, emb_dim, padding_idx=0) for b in id_buckets
        )
        self.seq_embedding = (
            self.embeddings[item_field] if share and item_field is not None
            else nn.Embedding(seq_buckets, emb_dim, padding_idx=0)
        )
        self.query = nn.Parameter(torch.randn(emb_dim) * 0.1)
        width = n_dense + len(id_buckets) * emb_dim + 2 * emb_dim + 1
        self.cross = nn.ModuleList(CrossLayer(width) for _ in range(n_cross))
        self.deep = mlp([width, *deep], final_activation=True)
        self.heads = nn.Linear(width + (deep[-1] if deep else 0), len(self.tasks))

    def logits(self, dense: torch.Tensor, ids: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Return logits ``[n, T]``."""
        embs = [e(ids[:, k]) for k, e in enumerate(self.embeddings)]
        mask = (seq > 0).to(dense.dtype)
        seq_emb = self.seq_embedding(seq)
        mean = masked_mean(seq_emb, mask)
        query = embs[self.item_field] if self.item_field is not None else self.query
        attn = masked_attention(seq_emb, mask, query)
        target = embs[self.item_field] if self.item_field is not None else attn
        match = (target * mean).sum(dim=-1, keepdim=True)
        x0 = torch.cat([dense, *embs, mean, attn, match], dim=-1)
        x = x0
        for layer in self.cross:
            x = layer(x0, x)
        return self.heads(torch.cat([x, self.deep(x0)], dim=-1))

    def forward(self, dense: torch.Tensor, ids: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
        """Return per-task probabilities ``[n, T]``."""
        return torch.sigmoid(self.logits(dense, ids, seq))


def combine_scores(probs: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> np.ndarray:
    """Return ``sum(weights[t] * probs[t])`` over the weighted tasks, float32 ``[n]``.

    Tasks in ``probs`` without a weight count 0.

    Raises:
        FeatureSchemaError: a task has a non-zero weight but no probabilities, or the
            probability arrays differ in length.
    """
    missing = sorted(t for t, w in weights.items() if w != 0 and t not in probs)
    if missing:
        raise FeatureSchemaError(
            f"score weights name task(s) {missing} the model does not predict; it predicts "
            f"{sorted(probs)}: drop those weights or retrain with their labels"
        )
    lengths = {len(np.asarray(p)) for p in probs.values()}
    if len(lengths) > 1:
        raise FeatureSchemaError(f"task probabilities differ in length: {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    out = np.zeros(n, dtype=np.float64)
    for task, w in weights.items():
        if w != 0:
            out += float(w) * np.asarray(probs[task], dtype=np.float64)
    return out.astype(np.float32)
