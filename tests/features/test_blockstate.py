"""BlockShard (the streaming block logic) against the one-event-at-a-time reference."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregations import build_aggregation
from features.blockstate import BlockShardConfig, classify_late
from features.reference import reference_blocks, reference_late
from features.spec_loader import load_features
from schemas.columnar import records_to_columns

FEATURES = load_features("features.yaml")
T0 = 1_764_547_200_000  # 2025-12-01T00:00:00Z
LATENESS = 60_000


def _views(seed: int, n: int):
    rng = np.random.default_rng(seed)
    ts = T0 + np.sort(rng.integers(0, 6 * 3_600_000, n))
    ts = ts + rng.integers(-300_000, 1, n) * (rng.random(n) < 0.1)  # some out of order
    return [
        {
            "event_id": f"v{seed}-{i}", "event_ts": int(ts[i]),
            "user_id": f"u{rng.integers(0, 20)}", "item_id": f"i{rng.zipf(1.5) % 50}",
            "author_id": f"a{rng.integers(0, 5)}", "topic": f"t{rng.integers(0, 4)}",
            "surface": str(rng.choice(["explore", "follow", "nearby"])),
            "dwell_ms": int(rng.integers(0, 20_000)), "position": int(rng.integers(0, 20)),
            "request_id": None,
        }
        for i in range(n)
    ]


def _run_shards(records_by_part, batch_size, snapshot_every=None):
    """Feed partitions through one shard per (topic, entity); return all written blocks."""
    written = {}
    for entity in ("item_id", "user_id", "author_id"):
        feats = tuple(f for f in FEATURES.for_source("views") if f.entity == entity)
        config = BlockShardConfig(topic="views", entity_field=entity, features=feats)
        shard = config.build()
        for part, records in records_by_part.items():
            prev_max = -(2**62)
            for i in range(0, len(records), batch_size):
                chunk = records[i:i + batch_size]
                cols = records_to_columns("views", chunk)
                late, prev_max = classify_late(prev_max, np.asarray(cols.columns["event_ts"]),
                                               LATENESS)
                shard.add_batch(cols.filter(~late))
                shard.advance(part, prev_max - LATENESS)
                for w in shard.flush(shard.watermark(list(records_by_part))).writes():
                    written[(w.feature_key, w.entity_id, w.start, w.size)] = w.rep
                if snapshot_every and (i // batch_size) % snapshot_every == 0:
                    shard = config.build(pickle.loads(pickle.dumps(shard.snapshot())))
        for w in shard.flush(None).writes():
            written[(w.feature_key, w.entity_id, w.start, w.size)] = w.rep
    return written


def _compare(written, oracle):
    specs = {f.key: f for f in FEATURES.features}
    assert set(written) == set(oracle)
    for key, rep in oracle.items():
        agg = build_aggregation(specs[key[0]])
        got = agg.from_bytes(written[key])
        assert_same_rep(agg, got, rep, key)


def assert_same_rep(agg, got, want, key=None):
    """Exact aggregations: equal values. KLL compaction is randomized: within rank error."""
    if agg.kind == "approx_quantile":
        from tests.dataflows.flowcheck import quantile_close

        assert got.n == want.n, key
        assert quantile_close(agg, got, want), key
    else:
        assert agg.finalize(got) == agg.finalize(want), key


@pytest.mark.parametrize("batch_size", [1, 7, 500])
def test_shard_blocks_equal_reference(batch_size):
    parts = {"views:0": _views(1, 400), "views:1": _views(2, 300)}
    oracle = reference_blocks(FEATURES.for_source("views"), parts, LATENESS)
    _compare(_run_shards(parts, batch_size), oracle)


def test_snapshot_and_resume_gives_the_same_blocks():
    parts = {"views:0": _views(3, 500)}
    oracle = reference_blocks(FEATURES.for_source("views"), parts, LATENESS)
    _compare(_run_shards(parts, 50, snapshot_every=2), oracle)


@settings(max_examples=50, deadline=None)
@given(ts=st.lists(st.integers(0, 10_000), max_size=60), cut=st.integers(0, 60),
       lateness=st.integers(0, 3_000))
def test_classify_late_is_independent_of_batching(ts, cut, lateness):
    arr = np.array(ts, dtype=np.int64)
    whole, _ = classify_late(-(2**62), arr, lateness)
    a, m = classify_late(-(2**62), arr[:cut], lateness)
    b, _ = classify_late(m, arr[cut:], lateness)
    assert np.concatenate([a, b]).tolist() == whole.tolist()
    assert whole.tolist() == reference_late([{"event_ts": t} for t in ts], lateness)


def test_flush_leaves_out_exactly_the_blocks_past_retention():
    """``expire`` drops what the store would drop on arrival, and nothing else."""
    from features.tiling import retention

    feats = tuple(f for f in FEATURES.for_source("views") if f.entity == "item_id")
    keep: dict[int, int] = {}
    for f in feats:
        for size, ms in retention(f.windows, f.block_sizes).items():
            keep[size] = max(keep.get(size, 0), ms)
    specs = {f.key: f for f in feats}
    config = BlockShardConfig(topic="views", entity_field="item_id", features=feats)
    plain, pruned = config.build(), config.build()
    records = _views(4, 3000)
    for r in records:  # stretch the six hours to six days: past the 1d windows' edge
        r["event_ts"] = T0 + (r["event_ts"] - T0) * 24
    prev_max, dropped, sent = -(2**62), 0, set()
    for i in range(0, len(records), 250):
        cols = records_to_columns("views", records[i:i + 250])
        late, prev_max = classify_late(prev_max, np.asarray(cols.columns["event_ts"]), LATENESS)
        for shard in (plain, pruned):
            shard.add_batch(cols.filter(~late))
            shard.advance("views:0", prev_max - LATENESS)
        wm = plain.watermark(["views:0"])
        expire = {size: wm - ms for size, ms in keep.items()}
        everything = plain.flush(wm, resend_sealed=False).writes()
        # left out: blocks past retention never written before (one written before is sent
        # again, so the store's write drops its older version)
        want = {(w.feature_key, w.entity_id, w.start, w.size): w.rep
                for w in everything if w.start + w.size > expire[w.size]
                or (w.feature_key, w.entity_id, w.start, w.size) in sent}
        dropped += len(everything) - len(want)
        got = {(w.feature_key, w.entity_id, w.start, w.size): w.rep
               for w in pruned.flush(wm, resend_sealed=False, expire=expire).writes()}
        sent |= set(got)
        assert set(got) == set(want)
        for key, rep in want.items():  # KLL compaction is randomized: compare as estimates
            agg = build_aggregation(specs[key[0]])
            assert_same_rep(agg, agg.from_bytes(got[key]), agg.from_bytes(rep), key)
    assert dropped > 0  # old blocks really were left out
