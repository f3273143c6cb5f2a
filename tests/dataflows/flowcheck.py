"""Helpers for dataflow tests: a small generated world in Kafka and its brute-force oracle."""

from __future__ import annotations

from typing import Any

from features.aggregations import build_aggregation
from features.reference import reference_blocks
from features.spec import FeatureSet
from features.store import open_store
from tessera.synth import WorldConfig, generate_records, write_to_kafka
from tessera.synth.sinks import partition_of
from tessera.topics import list_topics

LATENESS_MS = 60_000


def small_world(**overrides: Any) -> WorldConfig:
    """A world of a few thousand events over a few hours, with late and malformed records."""
    params = {"seed": 11, "n_users": 60, "n_items": 150, "n_authors": 12, "n_topics": 6,
              "duration_ms": 6 * 3_600_000, "total_views": 3_000, "late_fraction": 0.05,
              "late_max_ms": 10 * 60_000, "malformed_fraction": 0.01}
    params.update(overrides)
    return WorldConfig(**params)


def produce_world(bootstrap: str, config: WorldConfig, batch_events: int = 200):
    """Write the world to Kafka; return the generation summary."""
    return write_to_kafka(config, bootstrap, batch_events=batch_events)


def oracle_for(bootstrap: str, config: WorldConfig, features: FeatureSet):
    """Reference blocks of the world as the flow must see it (per-partition order)."""
    records = generate_records(config)
    parts: dict[str, list[dict]] = {}
    n_parts = list_topics(bootstrap)
    for topic in features.sources:
        key = "item_id" if topic == "items" else "user_id"
        for p in range(n_parts[topic]):
            parts[f"{topic}:{p}"] = []
        for rec in records[topic]:
            parts[f"{topic}:{partition_of(rec[key], n_parts[topic])}"].append(rec)
    return reference_blocks(features.features, parts, LATENESS_MS)


def store_blocks(store_url: str, features: FeatureSet, entity_ids: dict[str, set[str]]):
    """Every block in the store for the given entities: {(feature_key, entity, start, size): rep}."""
    out = {}
    with open_store(store_url, readonly=True) as store:
        for topic in features.sources:
            for etype in {f.entity_type for f in features.for_source(topic)}:
                ids = sorted(entity_ids.get(etype, ()))
                for eid, table in zip(ids, store.get_block_tables(etype, topic, ids)):
                    if table is None:
                        continue
                    for fk, start, size, rep in table.to_rows():
                        out[(fk, eid, start, size)] = rep
    return out


def expiry_for(store_url: str, features: FeatureSet, lateness_ms: int = LATENESS_MS):
    """Return ``expired(key) -> bool``: the block is past its size's retention.

    Retention drops such blocks whenever a record is rewritten, so whether one is still in
    the store depends on timing; comparisons ignore them.
    """
    from dataflows.blocks import BlocksFlowConfig

    keep = BlocksFlowConfig(bootstrap="-", store_url=store_url, features=features,
                            lateness_ms=lateness_ms).retention()
    with open_store(store_url, readonly=True) as store:
        wms = store.get_watermarks("blocks/")
    specs = {f.key: f for f in features.features}

    def expired(key) -> bool:
        spec = specs[key[0]]
        marks = [v for k, v in wms.items() if k.startswith(f"blocks/{spec.source}/{spec.entity}/")]
        if not marks:
            return False
        limit = min(marks) - keep[(spec.entity_type, spec.source)][key[3]]
        return key[2] + key[3] <= limit

    return expired


def compare_to_oracle(got: dict, oracle: dict, features: FeatureSet, expired=None) -> list[str]:
    """Differences between stored blocks and the oracle (empty when identical).

    ``expired(key)``: blocks the store may have dropped by retention are not required.
    """
    specs = {f.key: f for f in features.features}
    problems = []
    if expired is not None:
        oracle = {k: v for k, v in oracle.items() if k in got or not expired(k)}
    for key in sorted(set(oracle) - set(got))[:5]:
        problems.append(f"missing {key}")
    for key in sorted(set(got) - set(oracle))[:5]:
        problems.append(f"unexpected {key}")
    for key, rep in oracle.items():
        if key not in got:
            continue
        agg = build_aggregation(specs[key[0]])
        mine = agg.from_bytes(got[key])
        if agg.kind == "approx_quantile":
            ok = mine.n == rep.n and quantile_close(agg, mine, rep)
        else:
            ok = agg.finalize(mine) == agg.finalize(rep)
        if not ok:
            detail = f" (n {mine.n} vs {rep.n})" if agg.kind == "approx_quantile" else ""
            problems.append(f"differs {key}: {agg.finalize(mine)} != {agg.finalize(rep)}{detail}")
        if len(problems) > 10:
            break
    return problems


def quantile_close(agg, got, want, eps: float = 0.05) -> bool:
    """KLL compaction is randomized: the value got must sit at the quantile's rank in want."""
    value = agg.finalize(got)
    if value == agg.finalize(want):
        return True
    lo = want.get_rank(value, inclusive=False)
    hi = want.get_rank(value, inclusive=True)
    return lo - eps <= agg.quantile <= hi + eps


def entity_ids_of(oracle: dict, features: FeatureSet) -> dict[str, set[str]]:
    """Entity ids per entity type that appear in the oracle."""
    specs = {f.key: f for f in features.features}
    out: dict[str, set[str]] = {}
    for fk, eid, _, _ in oracle:
        out.setdefault(specs[fk].entity_type, set()).add(eid)
    return out
