"""The slow, obviously correct reference: blocks computed one event at a time.

Streaming, batch and replay paths are all tested against ``reference_blocks``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from features.aggregations import build_aggregation
from features.expressions import parse_filter
from features.spec import FeatureSpec

BlockKey = tuple[str, str, int, int]  # (feature_key, entity_id, start, size)


def reference_late(records: Sequence[Mapping[str, Any]], lateness: int) -> list[bool]:
    """Per record in partition order: late when ``event_ts < max(earlier event_ts) - lateness``."""
    out, running = [], None
    for r in records:
        ts = r["event_ts"]
        out.append(running is not None and ts < running - lateness)
        running = ts if running is None else max(running, ts)
    return out


def reference_blocks(
    features: Iterable[FeatureSpec],
    partitions: Mapping[str, Sequence[Mapping[str, Any]]],
    lateness: int,
) -> dict[BlockKey, Any]:
    """Return the rep of every non-empty block, folding events one by one.

    Args:
        features: feature specs (any sources; each reads its own topic's partitions).
        partitions: ``"topic:partition" -> records`` in partition order.
        lateness: allowed lateness in ms (late events are left out).
    """
    out: dict[BlockKey, Any] = {}
    specs = list(features)
    for part, records in partitions.items():
        topic = part.split(":")[0]
        late = reference_late(records, lateness)
        for spec in specs:
            if spec.source != topic:
                continue
            agg = build_aggregation(spec)
            flt = parse_filter(spec.filter) if spec.filter else None
            for rec, is_late in zip(records, late):
                if is_late or rec.get(spec.entity) is None:
                    continue
                if flt is not None and not flt.evaluate_row(rec):
                    continue
                value = rec.get(spec.value) if spec.value else None
                if spec.value and value is None:
                    continue
                if agg.needs_value and not isinstance(value, str):
                    value = float(value)
                ts = rec["event_ts"]
                for size in spec.block_sizes:
                    key = (spec.key, rec[spec.entity], ts - ts % size, size)
                    prev = out.get(key, agg.identity())
                    out[key] = agg.combine(prev, agg.map(value, ts))
    return out
