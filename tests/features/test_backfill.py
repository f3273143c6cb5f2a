"""Backfill end to end on Iceberg: raw events -> batch blocks -> training examples -> new
version with point-in-time feature columns, equal to brute force over the raw events."""

from __future__ import annotations

import numpy as np
import pytest

from features.aggregations import build_aggregation
from features.assembly import aggregate_raw
from features.backfill import run_backfill
from features.batch import run_batch_blocks
from features.expressions import parse_derived, parse_filter
from features.offline.raw import RawTables
from features.offline.training import BASE_VERSION, TrainingTables
from features.pointintime import query_ends
from features.spec_loader import load_features
from features.tiling import window_bounds
from features.timeutil import DAY, MINUTE
from schemas.columnar import records_to_columns
from tessera.synth import WorldConfig, generate_records

pytestmark = pytest.mark.integration
FEATURES = load_features("features.yaml")
NAMES = ["item_views_1h", "item_views_1d", "item_dwell_mean_1d", "item_dwell_min_1d",
         "user_clicks_1d", "author_views_1d", "item_ctr_1d", "item_dwell_sum_1d"]


def test_backfill_equals_brute_force_point_in_time(tmp_path):
    world = WorldConfig(seed=8, n_users=50, n_items=120, n_authors=10, n_topics=5,
                        duration_ms=2 * DAY, total_views=2_500, late_fraction=0.03)
    records = generate_records(world)
    raw = RawTables.open(tmp_path / "wh")
    for topic in ("views", "engagements", "impressions"):
        cols = records_to_columns(topic, records[topic])
        n = len(cols)
        raw.append(topic, cols, np.zeros(n, np.int64), np.arange(n, dtype=np.int64), {0: n})
    start, end = world.start_ts - DAY, world.start_ts + 4 * DAY
    run_batch_blocks(raw, raw.offline, None, FEATURES, start, end)

    # training examples: the impressions of day 2, with watermarks lagging 0-20 minutes
    rng = np.random.default_rng(1)
    imps = [r for r in records["impressions"]
            if world.start_ts + DAY <= r["event_ts"] < world.start_ts + 2 * DAY][:300]
    rows = []
    for r in imps:
        rows.append({**r, "feature_watermark": r["event_ts"] - int(rng.integers(0, 20)) * MINUTE,
                     **{f"label_{a}": 0 for a in ("click", "like", "share", "save", "hide")},
                     "first_engagement_ms": None, "label_window_ms": 1_800_000,
                     "matured_at": r["event_ts"] + 1_800_000})
    training = TrainingTables(raw.offline)
    training.append_rows(rows)

    rep = run_backfill(training, raw.offline, FEATURES, NAMES, world.start_ts + DAY,
                       world.start_ts + 2 * DAY, version="bf1")
    assert rep.rows == len(rows)
    got = training.scan_examples(version="bf1").to_pylist()
    assert len(got) == len(rows)
    assert training.scan_examples(version=BASE_VERSION).num_rows == len(rows)

    by_window = {f.window_name(w): (f, w) for f in FEATURES.features for w in f.windows}
    for row in got[:120]:
        end_ts = int(query_ends(np.array([row["event_ts"]]), np.array([row["feature_watermark"]]),
                                5 * MINUTE)[0])
        values = {}
        for name in NAMES:
            if name not in by_window:
                continue
            spec, w = by_window[name]
            wb = window_bounds(end_ts, w, end_ts, spec.block_sizes)
            assert wb.end <= row["feature_watermark"]  # never at or after the watermark
            flt = parse_filter(spec.filter) if spec.filter else None
            evs = [e for e in records[spec.source] if e[spec.entity] == row[spec.entity]
                   and (flt is None or flt.evaluate_row(e))]
            agg = build_aggregation(spec)
            vals = [float(e[spec.value]) for e in evs] if spec.value else None
            want = agg.finalize(aggregate_raw(
                agg, vals, np.array([e["event_ts"] for e in evs], dtype=np.int64),
                wb.start, wb.end))
            values[name] = want if want is not None else spec.default
            assert row[f"feature_{name}"] == pytest.approx(values[name]), (name, row["impression_id"])
        d = next(x for x in FEATURES.derived if x.name == "item_ctr_1d")
        inputs = {i: values.get(i) for i in d.inputs}
        if all(v is not None for v in inputs.values()):
            want = parse_derived(d.expression).evaluate_row(inputs, default=d.default)
            assert row["feature_item_ctr_1d"] == pytest.approx(want)
