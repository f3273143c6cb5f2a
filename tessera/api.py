"""A small Python API for notebooks and scripts: look up feature vectors by id.

Example::

    from tessera.api import feature_client
    client = feature_client()                       # $TESSERA_HOME/store, features.yaml
    res = client.get_features("item", ["i1", "i2"], ["item_views_1h", "item_ctr_1d"])
    res.row(0)      # {'item_views_1h': 12.0, 'item_ctr_1d': 0.047}
    res.watermark, res.stale, res.missing

Point-in-time values for any rows (a *spine*), from the offline blocks::

    from tessera.api import get_historical_features
    table = get_historical_features(spine, ["item_ratings_30d", "user_rated"],
                                    warehouse=".tessera/warehouse")
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


def read_spine(path: str | Path):
    """Read a spine file (``.parquet``/``.pq``, else CSV with a header) as a pyarrow Table."""
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    path = Path(path)
    if path.suffix.lower() in (".parquet", ".pq"):
        return pq.read_table(path)
    return pcsv.read_csv(path)


def get_historical_features(
    spine,
    names: list[str],
    *,
    features=None,
    warehouse: str | Path = ".tessera/warehouse",
    timestamp: str = "event_ts",
    watermark: str | None = None,
    warn=None,
    progress=None,
    engine: str = "local",
    ray_address: str | None = None,
):
    """Feature values at any (entity, time) rows, computed from the offline blocks.

    Args:
        spine: a pyarrow Table (or anything ``pyarrow.table`` takes, e.g. a pandas frame)
            with the features' entity columns and a ``timestamp`` column.
        names: feature names (every window), window values (``item_views_1h``) or derived.
        features: a ``FeatureSet`` or the path of a features file (default features.yaml).
        warehouse: the Iceberg warehouse holding the blocks (sealed by ``tessera worker
            blocks --warehouse``, or written by ``tessera batch blocks``).
        timestamp: the column of each row's time (epoch ms, timestamps or ISO-8601).
        watermark: optional column of the watermark each row's read saw.
        warn: called with a message for each feature with no block at all in range
            (default: ``warnings.warn``).
        progress: called with a line after each feature (default: nothing).
        engine: ``local`` (this process) or ``ray`` (a Ray cluster: ``ray_address``, an
            already initialized Ray runtime, or a local one started for the call; needs
            ``pip install -e '.[ray]'``). Both give the same values.

    Returns:
        The spine with one column per window value and derived feature; a window with no
        data is null (``last_n``: an empty list). See ``features.backfill.spine_columns``.
    """
    import pyarrow as pa

    from features.backfill import spine_columns
    from features.offline.tables import OfflineTables
    from features.spec import FeatureSet

    if not isinstance(spine, pa.Table):
        spine = pa.table(spine)
    fs = features if isinstance(features, FeatureSet) else load_features(features or
                                                                         "features.yaml")
    tables = OfflineTables.open(warehouse)
    if warn is None:
        import warnings

        def warn(message: str) -> None:
            warnings.warn(message, stacklevel=3)
    if engine == "local":
        return spine_columns(spine, fs, names, tables.scan_blocks, timestamp=timestamp,
                             watermark=watermark, warn=warn, progress=progress)
    if engine != "ray":
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    from features.ray_engine import RayBackfillEngine, ray_runtime

    with ray_runtime(ray_address):
        return spine_columns(spine, fs, names, tables.scan_blocks, timestamp=timestamp,
                             watermark=watermark, warn=warn, progress=progress,
                             engine=RayBackfillEngine(tables))


def get_sequences(
    user_ids: list[str],
    *,
    at: int | None = None,
    limit: int | None = None,
    store_url: str | None = None,
) -> list[list[dict]]:
    """Each user's stored actions, newest first (ties: larger event id first).

    Args:
        user_ids: the users.
        at: only actions strictly before this time (epoch ms). The store keeps each user's
            newest ``--max-len`` actions, so a past ``at`` sees those of them before it.
        limit: at most this many actions per user.
        store_url: the online store (default: the commands' store).

    Returns:
        One list per user of ``{ts, item_id, action, dwell_ms, event_id}`` dicts.
    """
    from dataflows.sequences import ENTITY_TYPE

    with open_store(store_url or default_store_url(), readonly=True) as store:
        seqs = store.get_sequences(ENTITY_TYPE, list(user_ids))
    out = []
    for seq in seqs:
        keep = seq.ts < at if at is not None else slice(None)
        ts, items, actions = seq.ts[keep], seq.item_ids[keep], seq.actions[keep]
        dwell, events = seq.dwell_ms[keep], seq.event_ids[keep]
        rows = [{"ts": int(t), "item_id": i, "action": a, "dwell_ms": int(d), "event_id": e}
                for t, i, a, d, e in zip(ts.tolist(), items.tolist(), actions.tolist(),
                                         dwell.tolist(), events.tolist())]
        out.append(rows[:limit] if limit else rows)
    return out
