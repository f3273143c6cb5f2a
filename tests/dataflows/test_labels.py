"""The label join: state rules (unit), the training table, and the flow on a real broker."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from features.labeljoin import (
    LabelJoin,
    LabelJoinConfig,
    join_reference,
)
from features.offline.tables import OfflineTableError
from features.offline.training import (
    BASE_VERSION,
    LABEL_ACTIONS,
    TrainingTables,
    decode_json_columns,
    examples_to_arrow,
)
from schemas.registry import topic_schema

MIN = 60_000
W = 10 * MIN  # label window of the unit tests
PARTS = ["impressions:0", "engagements:0"]


def imp(iid: str, ts: int, **kw) -> dict:
    rec = {"impression_id": iid, "event_id": iid, "event_ts": ts, "request_id": "r1",
           "user_id": "u1", "item_id": "i1", "author_id": "a1", "topic": "t1", "position": 0,
           "feed_type": "EXPLORE", "source": "ann", "model_versions": {"l2": "m3"},
           "scores": {"l2": 0.5}, "features": {"item_views_1h": 3.0},
           "feature_watermark": ts - ts % (5 * MIN)}
    rec.update(kw)
    return rec


def eng(eid: str, iid: str, ts: int, action: str = "click") -> dict:
    return {"event_id": eid, "event_ts": ts, "impression_id": iid, "user_id": "u1",
            "item_id": "i1", "action": action}


def join(window: int = W, lateness: int = MIN) -> LabelJoin:
    return LabelJoinConfig(label_window_ms=window, lateness_ms=lateness).build()


def emit(j: LabelJoin, wm: int) -> list[dict]:
    for p in PARTS:
        j.advance(p, wm)
    return j.flush(j.watermark(PARTS))


def labels(row: dict) -> dict[str, int]:
    return {a: row[f"label_{a}"] for a in LABEL_ACTIONS}


# ------------------------------------------------------------------- state rules


def test_example_waits_for_the_window_then_carries_labels_and_delay():
    # t(min)  0        2   4              10
    #         imp ──── click like ─────── | window end: emitted when wm >= 10
    j = join()
    j.add_impression(imp("a", 0))
    j.add_engagement(eng("e1", "a", 2 * MIN))
    j.add_engagement(eng("e2", "a", 4 * MIN, "like"))
    assert emit(j, 10 * MIN - 1) == []
    [row] = emit(j, 10 * MIN)
    assert labels(row) == {"click": 1, "like": 1, "share": 0, "save": 0, "hide": 0}
    assert row["first_engagement_ms"] == 2 * MIN
    assert row["matured_at"] == 10 * MIN and row["label_window_ms"] == W
    assert row["features"] == {"item_views_1h": 3.0} and row["position"] == 0
    assert j.keys == {}


def test_engagement_before_its_impression_waits_in_the_state():
    # arrival:   e1(click @3) ........ imp a (@0)
    # event t:   0 imp ─── 3 click ─── 10 end
    j = join()
    assert j.add_engagement(eng("e1", "a", 3 * MIN)) == "pending"
    assert emit(j, 1 * MIN) == []  # no impression yet: nothing to emit, nothing dropped
    j.add_impression(imp("a", 0))
    [row] = emit(j, 10 * MIN)
    assert row["label_click"] == 1 and row["first_engagement_ms"] == 3 * MIN
    assert j.counters["orphans_dropped"] == 0


def test_engagement_whose_impression_never_comes_is_dropped_and_counted():
    # e1 @3; waits until wm passes 3 + window(10) + lateness(1) = 14
    j = join()
    j.add_engagement(eng("e1", "zzz", 3 * MIN))
    assert emit(j, 14 * MIN - 1) == [] and "zzz" in j.keys
    assert emit(j, 14 * MIN) == []
    assert "zzz" not in j.keys and j.counters["orphans_dropped"] == 1


def test_duplicated_impressions_first_wins_and_engagements_count_once():
    # imp a (position 1), imp a again (position 7), click e1 twice, like e2
    j = join()
    assert j.add_impression(imp("a", 0, position=1)) is True
    assert j.add_impression(imp("a", 0, position=7)) is False
    j.add_engagement(eng("e1", "a", MIN))
    assert j.add_engagement(eng("e1", "a", MIN)) == "duplicate"
    j.add_engagement(eng("e2", "a", 2 * MIN, "like"))
    [row] = emit(j, 10 * MIN)
    assert row["position"] == 1 and row["label_click"] == 1 and row["label_like"] == 1
    assert j.counters["duplicate_impressions"] == 1
    assert j.counters["duplicate_engagements"] == 1
    # a copy of the impression after it was emitted is not emitted again
    assert j.add_impression(imp("a", 0, position=9)) is False
    assert emit(j, 11 * MIN) == []


def test_engagements_after_the_window_are_not_labels():
    # 0 imp ──── 9.99 save ── | 10 end | ── 12 click (outside: late_label)
    j = join()
    j.add_impression(imp("a", 0))
    assert j.add_engagement(eng("e1", "a", W - 1, "save")) == "label"
    assert j.add_engagement(eng("e2", "a", 12 * MIN)) == "late_label"
    [row] = emit(j, 12 * MIN)
    assert labels(row) == {"click": 0, "like": 0, "share": 0, "save": 1, "hide": 0}
    assert row["first_engagement_ms"] == W - 1
    assert j.counters["late_labels"] == 1


def test_pending_engagement_outside_the_window_is_a_late_label():
    # arrival: e1 (@15) before imp a (@0); window ends at 10, so e1 is no label
    j = join()
    j.add_engagement(eng("e1", "a", 15 * MIN))
    j.add_impression(imp("a", 0))
    [row] = emit(j, 10 * MIN)
    assert row["label_click"] == 0 and row["first_engagement_ms"] is None
    assert j.counters["late_labels"] == 1


def test_engagement_after_emit_is_counted_not_kept():
    j = join()
    j.add_impression(imp("a", 0))
    emit(j, 10 * MIN)
    assert j.add_engagement(eng("e9", "a", 5 * MIN)) == "after_emit"
    assert j.keys == {}
    emit(j, 11 * MIN + 1)  # tombstone forgotten after window + lateness
    assert j.tombstones == {}


def test_watermark_is_the_minimum_and_a_silent_partition_holds_it_back():
    j = join()
    j.add_impression(imp("a", 0))
    j.advance("impressions:0", 20 * MIN)
    assert j.flush(j.watermark(PARTS)) == []  # engagements:0 never heard from
    j.advance("engagements:0", 10 * MIN)
    assert len(j.flush(j.watermark(PARTS))) == 1


def test_snapshot_resumes_and_a_changed_config_starts_fresh():
    cfg = LabelJoinConfig(label_window_ms=W, lateness_ms=MIN)
    j = cfg.build()
    j.add_engagement(eng("e1", "a", MIN))
    j.add_impression(imp("b", 0))
    j.advance("impressions:0", 5)
    resumed = cfg.build(j.snapshot())
    resumed.add_impression(imp("a", 0))
    assert resumed.add_engagement(eng("e1", "a", MIN)) == "duplicate"
    rows = emit(resumed, 10 * MIN)
    assert sorted((r["impression_id"], r["label_click"]) for r in rows) == [("a", 1), ("b", 0)]
    other = LabelJoinConfig(label_window_ms=2 * W, lateness_ms=MIN).build(j.snapshot())
    assert other.keys == {} and other.partition_watermarks == {}


def test_streaming_join_equals_reference_on_shuffled_input():
    import random

    rng = random.Random(5)
    imps = [imp(f"i{k}", k * 7_000, position=k) for k in range(60)]
    imps += [imp("i3", 3 * 7_000, position=99), imp("i8", 8 * 7_000, position=99)]
    engs = [eng(f"e{k}", f"i{rng.randrange(60)}", rng.randrange(0, 80 * 7_000),
                rng.choice(LABEL_ACTIONS)) for k in range(150)]
    engs += engs[:10] + [eng("ex", "nope", 5)]
    events = [("i", r) for r in imps] + [("e", r) for r in engs]
    rng.shuffle(events)
    # keep each impression id's first copy first (first-wins is by arrival)
    firsts = {r["impression_id"] for r in imps[:60]}
    events.sort(key=lambda e: e[0] == "i" and e[1]["position"] == 99)
    j = join(window=W, lateness=0)
    got = []
    for kind, rec in events:
        (j.add_impression if kind == "i" else j.add_engagement)(rec)
        got += emit(j, -1)
    got += emit(j, 10**9)
    want = join_reference([r for k, r in events if k == "i"], [r for k, r in events if k == "e"], W)
    assert len(want) == len(firsts)
    key = lambda r: r["impression_id"]  # noqa: E731
    strip = lambda r: {k: v for k, v in r.items() if k != "matured_at"}  # noqa: E731
    assert [strip(r) for r in sorted(got, key=key)] == [strip(r) for r in want]
    assert sum(r["label_click"] for r in want) > 0


def test_config_is_validated():
    with pytest.raises(ValueError, match="label_window_ms must be an int >= 1"):
        LabelJoinConfig(label_window_ms=0)
    with pytest.raises(ValueError, match="lateness_ms must be an int >= 0"):
        LabelJoinConfig(label_window_ms=1, lateness_ms=-1)


def test_label_actions_match_the_engagement_schema():
    action = next(f for f in topic_schema("engagements").fields if f.name == "action")
    assert tuple(action.symbols) == LABEL_ACTIONS


# ------------------------------------------------------------------- training table


def test_training_table_versions_evolve_and_dedupe(tmp_path):
    tables = TrainingTables.open(tmp_path / "wh")
    [row] = join_reference([imp("a", 1_000)], [eng("e1", "a", 2_000)], W)
    row["matured_at"] = W
    assert tables.append_rows([row, row]) == 2  # at-least-once: a replayed append
    v2 = examples_to_arrow([dict(row, impression_id="b")]).append_column(
        "feature_item_ctr_1d", pa.array([0.25]))
    assert tables.append_examples(v2, "v2") == 1
    assert tables.append_rows([dict(row, impression_id="c")]) == 1  # old layout after evolution
    got = tables.scan_examples()
    assert got.column("impression_id").to_pylist() == ["a", "b", "c"]
    assert got.column("version").to_pylist() == [BASE_VERSION, "v2", BASE_VERSION]
    assert got.column("feature_item_ctr_1d").to_pylist() == [None, 0.25, None]
    assert tables.scan_examples(version="v2").num_rows == 1
    assert tables.scan_examples(from_ts=0, to_ts=1_000).num_rows == 0
    assert decode_json_columns(tables.scan_examples(version=BASE_VERSION))[0]["scores"] == {
        "l2": 0.5}
    with pytest.raises(OfflineTableError, match=r"miss the base column\(s\) \['user_id'\]"):
        tables.append_examples(v2.drop_columns(["user_id"]), "v3")


# ------------------------------------------------------------------- the flow


@pytest.mark.integration
@pytest.mark.parametrize("workers", [1, 2])
def test_label_flow_equals_reference(fresh_broker, tmp_path, workers):
    from confluent_kafka import Producer

    from dataflows.labels import LabelFlowConfig, build_label_flow
    from dataflows.runner import run_flow
    from features.blockstate import classify_late
    from features.offline.tables import OfflineTables
    from schemas.codec import DeadLetter
    from schemas.columnar import encode_batch, records_to_columns
    from tessera.synth import generate_records
    from tessera.synth.sinks import partition_of
    from tessera.topics import producer_config, read_to_end
    from tests.dataflows.flowcheck import small_world

    window, lateness, n_parts = 30 * MIN, MIN, 3
    records = generate_records(small_world(total_views=1_500, duration_ms=3 * 3_600_000))
    parts = {(t, p): [] for t in ("impressions", "engagements") for p in range(n_parts)}
    for t in ("impressions", "engagements"):
        for r in records[t]:
            parts[(t, partition_of(r["user_id"], n_parts))].append(r)

    # injected: duplicates right after their originals (so on time), first copy must win
    def duplicate(topic: str, every: int, **change) -> int:
        n = 0
        for key in [k for k in parts if k[0] == topic]:
            seq = parts[key]
            for i in range(len(seq) - 1, 0, -every):
                seq.insert(i + 1, dict(seq[i], **change))
                n += 1
        return n

    n_dup_imp = duplicate("impressions", 150, position=999)
    n_dup_eng = duplicate("engagements", 20)
    # a new impression X whose click is produced (engagements topic first) before it
    base = parts[("impressions", 1)][len(parts[("impressions", 1)]) // 2]
    x = dict(base, impression_id="X", event_id="X")
    ip = parts[("impressions", partition_of(x["user_id"], n_parts))]
    ip.insert(ip.index(base) + 1, x)
    click = {"event_id": "EX", "event_ts": x["event_ts"] + 2_000, "impression_id": "X",
             "user_id": x["user_id"], "item_id": x["item_id"], "action": "click"}
    ep = parts[("engagements", partition_of(x["user_id"], n_parts))]
    at = next((i for i, r in enumerate(ep) if r["event_ts"] > click["event_ts"]), len(ep))
    ep.insert(at, click)

    producer = Producer(producer_config(fresh_broker))
    for (topic, p), seq in sorted(parts.items(), key=lambda kv: kv[0][0] != "engagements"):
        for i in range(0, len(seq), 40):
            producer.produce(topic, encode_batch(records_to_columns(topic, seq[i:i + 40])),
                             partition=p)
    producer.produce("impressions", b"not an event", partition=0)
    assert producer.flush(30) == 0

    config = LabelFlowConfig(bootstrap=fresh_broker, warehouse=tmp_path / "wh",
                             label_window_ms=window, lateness_ms=lateness, bounded=True,
                             shards=3, commit_interval_ms=200)
    run_flow(build_label_flow(config), workers=workers)

    # the reference sees what the flow sees: the on-time events of each partition
    on_time: dict[str, list] = {"impressions": [], "engagements": []}
    n_late, final_wm = 0, None
    for (topic, _p), seq in parts.items():
        late, high = classify_late(-(2**62), np.array([r["event_ts"] for r in seq]), lateness)
        on_time[topic] += [r for r, x_late in zip(seq, late.tolist()) if not x_late]
        n_late += int(late.sum())
        final_wm = high - lateness if final_wm is None else min(final_wm, high - lateness)
    want = [r for r in join_reference(on_time["impressions"], on_time["engagements"], window)
            if r["event_ts"] + window <= final_wm]

    got = decode_json_columns(TrainingTables.open(tmp_path / "wh").scan_examples())
    assert all(r["matured_at"] >= r["event_ts"] + window for r in got)
    assert all(r["version"] == BASE_VERSION for r in got)
    strip = ("matured_at", "version")
    got_rows = [{k: v for k, v in r.items() if k not in strip} for r in got]
    want_rows = [{k: v for k, v in r.items() if k not in strip} for r in want]
    assert len(got_rows) == len(want_rows) > 500
    assert got_rows == want_rows
    assert sum(r["label_click"] for r in got_rows) > 20
    assert n_dup_imp > 3 and n_dup_eng > 3
    assert not any(r["position"] == 999 for r in got_rows)
    [rx] = [r for r in got_rows if r["impression_id"] == "X"]
    assert rx["label_click"] == 1 and rx["first_engagement_ms"] == 2_000

    # late events went to the batch-correction table; the bad payload to the DLQ
    # (count_rows, not scan_late_events: that dedupes by (topic, partition, offset), and the
    # events of one batch envelope share an offset)
    late_table = OfflineTables.open(tmp_path / "wh")
    assert late_table.count_rows("late_events") == n_late > 0
    # in one commit at the end of the run (one sink partition, whatever the worker count),
    # not one per batch with late events
    assert len(late_table.table("late_events").snapshots()) == 1
    dead = [DeadLetter.decode(m.value()) for m in read_to_end(fresh_broker, "deadletter")]
    assert len(dead) == 1 and dead[0].topic == "impressions"


def test_training_sink_replayed_after_a_crash_appends_every_row_once_on_disk(tmp_path):
    """A sink partition commits, is snapshotted, commits more and dies; a new partition
    resumed from the snapshot gets the rows after it again (the replay) plus new ones: the
    table ends with each row once, physically (``count_rows``), not only on read."""
    from dataflows.labels import _TrainingPartition

    [base] = join_reference([imp("a", 1_000)], [eng("e1", "a", 2_000)], W)
    rows = [dict(base, impression_id=f"i{k}", matured_at=W) for k in range(9)]
    wh = tmp_path / "wh"
    first = _TrainingPartition(wh, BASE_VERSION, 0, None)
    first.write_batch([rows[0:3]])
    state = first.snapshot()
    first.write_batch([rows[3:6]])  # committed after the snapshot, then the crash
    tables = TrainingTables.open(wh)
    assert tables.count_rows() == 6

    resumed = _TrainingPartition(wh, BASE_VERSION, 0, state)
    resumed.write_batch([rows[3:6] + rows[6:9]])  # the replay, then what is new
    resumed.close()
    assert tables.count_rows() == 9
    assert sorted(tables.scan_examples().column("impression_id").to_pylist()) == \
        [f"i{k}" for k in range(9)]
    assert resumed.skipped == 3

    # a snapshot written before the sequence number was kept (a plain list of pending rows)
    legacy = _TrainingPartition(wh, BASE_VERSION, 0, [rows[8]])
    legacy.close()
    assert tables.count_rows() == 9
