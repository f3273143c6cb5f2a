"""Pre-assembled values: finished window values plus watermark per entity (the design's option 2).

``refresh_preassembled`` computes, for every entity with blocks, the chosen window values at
the current trusted watermark and writes them with ``put_values``; the table's watermark is
published only after every row is written, so a reader never mixes rows of two watermarks
under one label (rows of another watermark are read from blocks instead).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import structlog

from features.client import PREASSEMBLED_TABLE, FeatureClient
from features.spec import FeatureSet
from features.store.base import NO_WATERMARK, OnlineStore

log = structlog.get_logger("features.preassembled")


@dataclass(frozen=True)
class PreassembleReport:
    """What one refresh did."""

    entity_type: str
    entities: int
    columns: tuple[str, ...]
    watermark: int
    seconds: float


def default_hot_features(features: FeatureSet, entity_type: str) -> list[str]:
    """Every numeric window value of ``entity_type`` (``last_n`` lists are left out)."""
    return [f.window_name(w) for f in features.features
            if f.entity_type == entity_type and f.aggregation != "last_n" for w in f.windows]


def refresh_preassembled(
    store: OnlineStore,
    features: FeatureSet,
    entity_type: str,
    names: Sequence[str] | None = None,
    *,
    table: str = PREASSEMBLED_TABLE,
    batch: int = 2_000,
    clock: Callable[[], int] | None = None,
    progress: Callable[[int], None] | None = None,
) -> PreassembleReport:
    """Recompute the pre-assembled values of every ``entity_type`` entity with blocks.

    Args:
        names: window feature names to keep (default: ``default_hot_features``).
        batch: entities per read and write.
    """
    t0 = time.perf_counter()
    names = list(names or default_hot_features(features, entity_type))
    client = FeatureClient(store, features, **({"clock": clock} if clock else {}))
    refs = client.resolve(entity_type, names)
    families = sorted({r.spec.source for r in refs})
    ids: dict[str, None] = {}
    for fam in families:
        for e in store.list_entity_ids(entity_type, fam):
            ids.setdefault(e, None)
    all_ids = list(ids)
    watermark = NO_WATERMARK
    done = 0
    for lo in range(0, len(all_ids), batch):
        chunk = all_ids[lo:lo + batch]
        res = client.get_features(entity_type, chunk, names, use_preassembled=False)
        if watermark == NO_WATERMARK:
            watermark = res.watermark
        elif res.watermark != watermark:  # the watermark moved mid-run: finish at the old one
            res = client.get_features(entity_type, chunk, names, use_preassembled=False,
                                      at=watermark)
        vals = np.where(res.missing, np.nan, res.values).astype(np.float32)
        store.put_values(entity_type, table,
                         [(e, vals[i], res.watermark) for i, e in enumerate(chunk)], names)
        done += len(chunk)
        if progress is not None:
            progress(done)
    if watermark != NO_WATERMARK:
        store.put_meta(f"values-columns/{entity_type}/{table}", ",".join(names).encode())
        store.set_watermark(f"values/{entity_type}/{table}", watermark)
    report = PreassembleReport(entity_type, len(all_ids), tuple(names), watermark,
                               time.perf_counter() - t0)
    log.info("preassembled", entity_type=entity_type, entities=report.entities,
             columns=len(names), watermark=watermark, seconds=round(report.seconds, 3))
    return report
