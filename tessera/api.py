"""A small Python API for notebooks and scripts: look up feature vectors by id.

Example::

    from tessera.api import feature_client
    client = feature_client()                       # $TESSERA_HOME/store, features.yaml
    res = client.get_features("item", ["i1", "i2"], ["item_views_1h", "item_ctr_1d"])
    res.row(0)      # {'item_views_1h': 12.0, 'item_ctr_1d': 0.047}
    res.watermark, res.stale, res.missing
"""

from __future__ import annotations

from pathlib import Path

from features.cache import FeatureCache
from features.client import FeatureClient, FeatureVectors
from features.spec_loader import load_features
from features.store import open_store
from tessera.home import default_store_url


def feature_client(
    store_url: str | None = None,
    features: str | Path = "features.yaml",
    *,
    cache: bool = False,
) -> FeatureClient:
    """Open the store read-only and return a ``FeatureClient`` over the feature definitions.

    ``store_url`` defaults to the commands' store (``tessera.home.default_store_url``).
    """
    return FeatureClient(open_store(store_url or default_store_url(), readonly=True), load_features(features),
                         cache=FeatureCache() if cache else None)


def get_features(
    entity_type: str,
    ids: list[str],
    names: list[str],
    *,
    at: int | None = None,
    store_url: str | None = None,
    features: str | Path = "features.yaml",
) -> FeatureVectors:
    """One-shot lookup: open, read, close."""
    client = feature_client(store_url, features)
    try:
        return client.get_features(entity_type, ids, names, at=at)
    finally:
        client.store.close()
