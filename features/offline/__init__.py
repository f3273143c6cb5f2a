"""Offline feature tables on Iceberg: sealed blocks and late events (see ``tables``).

The embedded default is a SQLite catalog beside a local warehouse::

    tables = OfflineTables.open("data/warehouse")
    tables.append_blocks(rows, written_ms=now_ms)
    blocks = tables.scan_blocks(feature_keys=["item_views"], start_from=t0, start_to=t1)
"""

from __future__ import annotations

from features.offline.tables import (
    BLOCK_KEY,
    LATE_EVENT_KEY,
    BlockRow,
    LateEventRow,
    OfflineTableError,
    OfflineTables,
    TableName,
)

__all__ = [
    "BLOCK_KEY",
    "LATE_EVENT_KEY",
    "BlockRow",
    "LateEventRow",
    "OfflineTableError",
    "OfflineTables",
    "TableName",
]
