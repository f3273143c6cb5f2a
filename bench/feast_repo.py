"""The one Feast repository layout the benchmarks' Feast peers use (local provider).

Imported by processes that may run in Feast's own venv: it needs only the standard library
until ``open_feature_store`` imports Feast.
"""

from __future__ import annotations

import textwrap
from pathlib import Path


def open_feature_store(root: Path, project: str, *, cache_registry: bool = True):
    """Write ``root/feature_store.yaml`` (SQLite online store, DuckDB offline store, file
    registry under ``root/data``) and return its ``FeatureStore``.

    ``cache_registry``: read the registry once for the whole run (``cache_ttl_seconds: 0``),
    as a long-running server would; else Feast's default refresh.
    """
    from feast import FeatureStore

    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    registry = (f"registry:\n  path: {data / 'registry.db'}\n  cache_ttl_seconds: 0"
                if cache_registry else f"registry: {data / 'registry.db'}")
    (root / "feature_store.yaml").write_text(textwrap.dedent(f"""\
        project: {project}
        provider: local
        """) + registry + textwrap.dedent(f"""
        offline_store:
          type: duckdb
        online_store:
          type: sqlite
          path: {data / 'online.db'}
        entity_key_serialization_version: 3
        """))
    return FeatureStore(repo_path=str(root))
