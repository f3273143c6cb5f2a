"""Two-tower retrieval: a user tower and an item tower meeting in one normalized space.

The user tower pools the user's hashed recent item ids (mean and learned-query attention)
and adds the dense user features; the item tower embeds the hashed item, author and topic
ids and adds the dense item features. Each ends in an MLP and an L2 normalization, so a
dot product is a cosine similarity; :class:`TwoTower` holds both and the softmax
temperature. Each tower is exported to ONNX on its own (see ``models.onnx_export``).

Inputs (all batch-first; the batch axis is dynamic in the exported models):

* user tower: ``seq`` int64 ``[n, L]`` (hashed ids, 0 = padding), ``user_dense`` float32
  ``[n, du]``; output ``user_embedding`` float32 ``[n, dim]``;
* item tower: ``item_ids`` int64 ``[n, 3]`` (hashed item, author, topic), ``item_dense``
  float32 ``[n, di]``; output ``item_embedding`` float32 ``[n, dim]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["ItemTower", "TwoTower", "UserTower", "l2_normalize", "masked_mean", "mlp"]

_NEG = -1e4
"""Score given to padded positions before a softmax (finite, so an all-padding row stays finite)."""


def mlp(sizes: Sequence[int], *, final_activation: bool = False) -> nn.Sequential:
    """Return Linear+ReLU layers through ``sizes`` (no activation after the last unless asked)."""
    layers: list[nn.Module] = []
    for k, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if k < len(sizes) - 2 or final_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """Scale rows to unit L2 norm (rows of zeros stay zero)."""
    return x / torch.sqrt((x * x).sum(dim=-1, keepdim=True)).clamp_min(1e-6)


def masked_mean(emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``emb [n, L, d]`` over positions where ``mask [n, L]`` is 1 (0 when none)."""
    # a batched matmul, not a broadcast multiply and sum: the same sums, and ONNX Runtime
    # runs MatMul about twice as fast as Mul + ReduceSum over [n, L, d] (bench/models.py)
    total = torch.matmul(mask.unsqueeze(1), emb).squeeze(1)
    return total / mask.sum(dim=1, keepdim=True).clamp_min(1.0)


def masked_attention(emb: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Softmax-attention pooling of ``emb [n, L, d]`` with ``query [n, d]`` or ``[d]``."""
    scale = float(emb.shape[-1]) ** -0.5
    if query.dim() == 1:
        scores = torch.matmul(emb, query) * scale
    else:
        scores = torch.matmul(emb, query.unsqueeze(-1)).squeeze(-1) * scale
    scores = scores.masked_fill(mask == 0, _NEG)
    weights = torch.softmax(scores, dim=-1) * mask
    return torch.matmul(weights.unsqueeze(1), emb).squeeze(1)


class UserTower(nn.Module):
    """Hashed sequence ids + dense user features -> normalized ``dim`` vector."""

    def __init__(self, *, seq_buckets: int, n_dense: int, emb_dim: int = 32, hidden: int = 64,
                 dim: int = 32):
        super().__init__()
        self.embedding = nn.Embedding(seq_buckets, emb_dim, padding_idx=0)
        self.query = nn.Parameter(torch.randn(emb_dim) * 0.1)
        self.mlp = mlp([2 * emb_dim + n_dense, hidden, dim])

    def forward(self, seq: torch.Tensor, user_dense: torch.Tensor) -> torch.Tensor:
        """Return the user embeddings ``[n, dim]``."""
        mask = (seq > 0).to(user_dense.dtype)
        emb = self.embedding(seq)
        pooled = torch.cat([masked_mean(emb, mask), masked_attention(emb, mask, self.query)], -1)
        return l2_normalize(self.mlp(torch.cat([pooled, user_dense], dim=-1)))


class ItemTower(nn.Module):
    """Hashed item/author/topic ids + dense item features -> normalized ``dim`` vector."""

    def __init__(self, *, id_buckets: Sequence[int], n_dense: int, emb_dim: int = 32,
                 hidden: int = 64, dim: int = 32):
        super().__init__()
        self.embeddings = nn.ModuleList(
            nn.Embedding(b, emb_dim, padding_idx=0) for b in id_buckets
        )
        self.mlp = mlp([len(id_buckets) * emb_dim + n_dense, hidden, dim])

    def forward(self, item_ids: torch.Tensor, item_dense: torch.Tensor) -> torch.Tensor:
        """Return the item embeddings ``[n, dim]``."""
        parts = [e(item_ids[:, k]) for k, e in enumerate(self.embeddings)]
        return l2_normalize(self.mlp(torch.cat([*parts, item_dense], dim=-1)))


class TwoTower(nn.Module):
    """Both towers and the softmax temperature used in training (not exported)."""

    def __init__(self, *, seq_buckets: int, n_user_dense: int, id_buckets: Sequence[int],
                 n_item_dense: int, emb_dim: int = 32, hidden: int = 64, dim: int = 32,
                 temperature: float = 0.05):
        super().__init__()
        self.user_tower = UserTower(seq_buckets=seq_buckets, n_dense=n_user_dense,
                                    emb_dim=emb_dim, hidden=hidden, dim=dim)
        self.item_tower = ItemTower(id_buckets=id_buckets, n_dense=n_item_dense,
                                    emb_dim=emb_dim, hidden=hidden, dim=dim)
        self.temperature = temperature

    def forward(self, seq: torch.Tensor, user_dense: torch.Tensor, item_ids: torch.Tensor,
                item_dense: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(user embeddings, item embeddings)`` for aligned rows."""
        return self.user_tower(seq, user_dense), self.item_tower(item_ids, item_dense)
