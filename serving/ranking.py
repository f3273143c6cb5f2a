"""Rankers: the learned models from the registry, and the popularity fallback.

A ``ModelBundle`` holds the loaded versions (retrieval towers + index, L1, L2). It is built
off the request path and swapped in with one assignment, so a request uses one consistent
bundle from start to end and a reload never fails a request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from tessera.logs import get_logger

log = get_logger("serving.ranking")

POPULARITY_FEATURES = ("item_views_1d", "item_ctr_1d")


class Ranker(Protocol):
    """Scores candidates from a dense feature matrix (rows = candidates)."""

    version: str
    feature_names: tuple[str, ...]

    def score(self, features: dict[str, np.ndarray], *, user: dict[str, Any],
              context: dict[str, Any] | None = None) -> np.ndarray:
        """One score per candidate (higher is better); ``context`` carries ids and the
        user's sequence for models that read them."""


@dataclass
class PopularityRanker:
    """Score = smoothed CTR x log views: the baseline and the degraded mode."""

    version: str = "popularity"
    feature_names: tuple[str, ...] = POPULARITY_FEATURES

    def score(self, features: dict[str, np.ndarray], *, user: dict[str, Any],
              context: dict[str, Any] | None = None) -> np.ndarray:
        views = np.nan_to_num(features.get("item_views_1d", np.zeros(0)), nan=0.0)
        ctr = np.nan_to_num(features.get("item_ctr_1d", np.zeros_like(views)), nan=0.0)
        return (ctr + 1e-3) * np.log1p(views)


@dataclass
class ModelBundle:
    """The models one request uses; immutable once published to the app."""

    l1: Any = None
    l2: Any = None
    retrieval: Any = None
    fallback: PopularityRanker = field(default_factory=PopularityRanker)

    @property
    def versions(self) -> dict[str, str]:
        """Model versions by kind (``popularity`` when a stage has no learned model)."""
        out = {"l1": self.fallback.version, "l2": self.fallback.version}
        if self.l1 is not None:
            out["l1"] = self.l1.version
        if self.l2 is not None:
            out["l2"] = self.l2.version
        if self.retrieval is not None:
            out["retrieval"] = self.retrieval.version
        return out

    def item_feature_names(self) -> tuple[str, ...]:
        """Item features any stage needs."""
        names: dict[str, None] = dict.fromkeys(self.fallback.feature_names)
        for m in (self.l1, self.l2):
            if m is not None:
                names.update(dict.fromkeys(m.item_features))
        return tuple(names)

    def author_feature_names(self) -> tuple[str, ...]:
        """Author features any stage needs (read per candidate's author)."""
        names: dict[str, None] = {}
        for m in (self.l1, self.l2):
            if m is not None:
                names.update(dict.fromkeys(getattr(m, "author_features", ())))
        return tuple(names)

    def user_feature_names(self) -> tuple[str, ...]:
        """User features any stage needs."""
        names: dict[str, None] = {}
        for m in (self.l1, self.l2, self.retrieval):
            if m is not None:
                names.update(dict.fromkeys(getattr(m, "user_features", ())))
        return tuple(names)
