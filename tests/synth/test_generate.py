"""The synthetic world generator: determinism, schema validity, causality, skew, lateness,
malformed payloads, and the Parquet and Kafka sinks."""

from __future__ import annotations

import dataclasses
from collections import Counter
from functools import cache
from pathlib import Path

import numpy as np
import pytest
from fastavro.validation import validate

from schemas.codec import DecodeError
from schemas.columnar import columns_to_records, decode_message
from schemas.registry import TOPICS, schema_for_topic
from tessera.synth import (
    World,
    WorldConfig,
    WorldConfigError,
    generate_events,
    generate_records,
    write_to_kafka,
    write_to_parquet,
)
from tessera.synth.generate import WATERMARK_BLOCK_MS, summarize
from tessera.synth.world import DAY, HOUR, MINUTE

SMALL = WorldConfig(
    seed=7,
    n_users=500,
    n_items=2_000,
    n_authors=100,
    n_topics=16,
    duration_ms=2 * DAY,
    total_views=20_000,
    chunk_ms=2 * HOUR,
)


@cache
def small_records() -> dict[str, list[dict]]:
    return generate_records(SMALL)


def _bad(payload: bytes, topic: str) -> bool:
    try:
        decode_message(payload, topic)
    except DecodeError:
        return True
    return False


# ---------------------------------------------------------------- config


def test_config_rejects_bad_values_with_the_parameter_named() -> None:
    with pytest.raises(WorldConfigError, match=r"WorldConfig.late_fraction must be a number in"):
        WorldConfig(late_fraction=1.5)
    with pytest.raises(WorldConfigError, match=r"duration_ms must be a whole number of minutes"):
        WorldConfig(duration_ms=DAY + 1)
    with pytest.raises(WorldConfigError, match=r"n_users must be an integer >= 1, got 0"):
        WorldConfig(n_users=0)
    with pytest.raises(TypeError):
        WorldConfig(1)  # type: ignore[misc]  # keyword-only


def test_world_affinity_is_in_unit_range_and_favours_the_users_top_topic() -> None:
    w = World(SMALL)
    users = np.arange(SMALL.n_users)
    aff = w.affinity(users[:, None], np.arange(SMALL.n_items)[None, :])
    assert aff.shape == (SMALL.n_users, SMALL.n_items)
    assert aff.min() >= 0 and aff.max() <= 1
    top = w.user_interest.argmax(axis=1)
    on_topic = w.item_topic[None, :] == top[:, None]
    assert aff[on_topic].mean() > aff[~on_topic].mean() + 0.3


# ---------------------------------------------------------------- determinism and schemas


def test_same_seed_gives_identical_records_and_another_seed_differs() -> None:
    again = generate_records(SMALL)
    assert again == small_records()
    other = generate_records(dataclasses.replace(SMALL, seed=8))
    assert other["views"] != again["views"]


def test_records_validate_against_the_avro_schemas() -> None:
    recs = small_records()
    for topic in TOPICS:
        assert recs[topic], topic
        schema = schema_for_topic(topic)
        for r in recs[topic][:: max(1, len(recs[topic]) // 2000)]:
            assert validate(r, schema, raise_errors=True)


def test_counts_ids_and_shapes() -> None:
    recs = small_records()
    assert len(recs["views"]) == SMALL.total_views
    assert len(recs["impressions"]) == SMALL.total_views
    assert len(recs["items"]) == SMALL.n_items
    for topic in TOPICS:
        ids = [r["event_id"] for r in recs[topic]]
        assert len(set(ids)) == len(ids), f"duplicate event ids in {topic}"
    v = recs["views"][0]
    assert v["user_id"].startswith("u") and v["item_id"].startswith("i")
    assert v["author_id"].startswith("a") and v["topic"].startswith("t")
    imp = recs["impressions"][0]
    assert imp["model_versions"] == {"l2": "bootstrap"}
    assert imp["scores"] == {} and imp["features"] == {}
    assert all(
        i["feature_watermark"] == i["event_ts"] - i["event_ts"] % WATERMARK_BLOCK_MS
        for i in recs["impressions"]
    )
    assert {r["surface"] for r in recs["views"]} == {"explore", "follow", "nearby"}
    assert {r["action"] for r in recs["engagements"]} == {"click", "like", "share", "save", "hide"}
    # sessions start in the period (the last ones may run a little past its end);
    # engagements may come long after it.
    ts = [r["event_ts"] for r in recs["impressions"]]
    assert SMALL.start_ts <= min(ts) and max(ts) < SMALL.end_ts + HOUR


def test_every_view_follows_its_impression_of_the_same_user_and_item() -> None:
    recs = small_records()
    imps = {i["impression_id"]: i for i in recs["impressions"]}
    by_request = Counter(i["request_id"] for i in recs["impressions"])
    assert max(by_request.values()) <= SMALL.page_size
    for v in recs["views"]:
        imp = imps["imp" + v["event_id"][1:]]
        assert (imp["user_id"], imp["item_id"], imp["position"], imp["request_id"]) == (
            v["user_id"],
            v["item_id"],
            v["position"],
            v["request_id"],
        )
        assert imp["event_ts"] < v["event_ts"]


def test_engagements_reference_earlier_impressions_of_the_same_user_and_item() -> None:
    recs = small_records()
    imps = {i["impression_id"]: i for i in recs["impressions"]}
    assert len(recs["engagements"]) > 0.02 * len(imps)
    delays = []
    for e in recs["engagements"]:
        imp = imps[e["impression_id"]]
        assert (imp["user_id"], imp["item_id"]) == (e["user_id"], e["item_id"])
        assert e["event_ts"] > imp["event_ts"]
        delays.append(e["event_ts"] - imp["event_ts"])
    d = np.array(delays)
    assert np.median(d) < 5 * MINUTE  # most within minutes ...
    assert d.max() > 2 * HOUR  # ... with a tail of hours


def test_items_are_created_before_they_are_viewed() -> None:
    recs = small_records()
    created = {i["item_id"]: i["created_ts"] for i in recs["items"]}
    assert sum(ts < SMALL.start_ts for ts in created.values()) > 0  # some exist before start
    assert all(created[v["item_id"]] <= v["event_ts"] for v in recs["views"])


def test_popularity_is_skewed() -> None:
    views = Counter(v["item_id"] for v in small_records()["views"])
    top = sum(c for _, c in views.most_common(SMALL.n_items // 100))
    assert top / SMALL.total_views > 0.15  # top 1% of items: far more than 1% of views


def test_engagement_depends_on_affinity() -> None:
    w = World(SMALL)
    recs = small_records()
    clicked = {e["impression_id"] for e in recs["engagements"] if e["action"] == "click"}
    imps = recs["impressions"]
    u = np.array([int(i["user_id"][1:]) for i in imps])
    it = np.array([int(i["item_id"][1:]) for i in imps])
    aff = w.affinity(u, it)
    hit = np.array([i["impression_id"] in clicked for i in imps])
    hi, lo = aff > np.quantile(aff, 0.75), aff < np.quantile(aff, 0.25)
    assert hit[hi].mean() > 1.5 * hit[lo].mean()


def test_traffic_follows_the_daily_curve() -> None:
    hours = np.array([v["event_ts"] // HOUR % 24 for v in small_records()["views"]])
    per_hour = np.bincount(hours, minlength=24)
    peak = int(SMALL.peak_hour_utc)
    assert per_hour[peak] > 2 * per_hour[(peak + 12) % 24]


# ---------------------------------------------------------------- emission order and lateness


def _out_of_order(ts: list[int]) -> int:
    a = np.array(ts)
    return int((a < np.maximum.accumulate(a)).sum())


def test_emission_is_in_event_time_order_without_late_events() -> None:
    recs = generate_records(dataclasses.replace(SMALL, late_fraction=0.0))
    for topic in TOPICS:
        assert _out_of_order([r["event_ts"] for r in recs[topic]]) == 0, topic


def test_late_fraction_emits_events_out_of_order_within_late_max() -> None:
    cfg = dataclasses.replace(SMALL, late_fraction=0.05, late_max_ms=5 * MINUTE)
    summary = summarize(cfg)
    views = generate_records(cfg)["views"]
    ts = np.array([v["event_ts"] for v in views])
    assert _out_of_order(ts.tolist()) > 0
    assert abs(summary.late["views"] / len(views) - 0.05) < 0.01
    # A late event is emitted at most late_max after its event time: once an event with
    # time t has been emitted, nothing older than t - late_max comes later.
    assert (np.maximum.accumulate(ts) - ts).max() <= cfg.late_max_ms
    # Lateness only reorders: the same events as without it.
    on_time = generate_records(dataclasses.replace(cfg, late_fraction=0.0))["views"]
    assert sorted(views, key=lambda r: r["event_id"]) == sorted(
        on_time, key=lambda r: r["event_id"]
    )


# ---------------------------------------------------------------- malformed payloads


def test_malformed_fraction_yields_the_expected_number_of_undecodable_payloads() -> None:
    cfg = dataclasses.replace(SMALL, malformed_fraction=0.01)
    summary = summarize(cfg)
    total_events = summary.total_events
    bad = 0
    for chunk in generate_events(cfg):
        for topic, payloads in chunk.malformed.items():
            assert all(_bad(p, topic) for p in payloads)
            bad += len(payloads)
    assert bad == summary.total_malformed
    assert abs(bad - 0.01 * total_events) < 5 * np.sqrt(0.01 * total_events)
    # Malformed payloads are extra: the valid events do not change.
    assert generate_records(cfg) == small_records()


# ---------------------------------------------------------------- sinks


def test_chunk_columns_round_trip_through_a_batch_message() -> None:
    from schemas.columnar import encode_batch
    from tessera.synth.sinks import compact

    chunk = next(iter(generate_events(SMALL)))
    for topic, cols in chunk.columns.items():
        part = compact(cols.take(np.arange(min(cols.n, 500))))
        back = decode_message(encode_batch(part), topic)
        assert columns_to_records(back) == columns_to_records(part)


def test_parquet_round_trip(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    summary = write_to_parquet(SMALL, tmp_path)
    recs = small_records()
    for topic in TOPICS:
        table = pq.read_table(tmp_path / f"{topic}.parquet")
        assert table.column_names == [f["name"] for f in schema_for_topic(topic)["fields"]]
        rows = table.to_pylist()
        assert len(rows) == summary.counts[topic] == len(recs[topic])
        for name in ("model_versions", "scores", "features"):
            for r in rows if topic == "impressions" else ():
                r[name] = dict(r[name])
        assert rows == recs[topic], topic


@pytest.mark.integration
def test_kafka_round_trip(broker: str, topic_factory) -> None:  # type: ignore[no-untyped-def]
    from tessera.synth.sinks import partition_of
    from tessera.topics import read_to_end

    cfg = dataclasses.replace(
        SMALL, total_views=2_000, n_items=300, malformed_fraction=0.005, duration_ms=DAY
    )
    names = {t: topic_factory(partitions=3, prefix=f"synth-{t}") for t in TOPICS}
    summary = write_to_kafka(cfg, broker, batch_events=250, topics=names)
    expected = generate_records(cfg)
    assert summary.total_events == sum(len(v) for v in expected.values())
    assert summary.total_events >= 4_000
    for topic in TOPICS:
        got: dict[int, list[dict]] = {}
        bad = 0
        for msg in read_to_end(broker, names[topic]):
            try:
                cols = decode_message(msg.value(), topic)
            except DecodeError:
                bad += 1
                continue
            got.setdefault(msg.partition(), []).extend(columns_to_records(cols))
        assert bad == summary.malformed[topic]
        key = "item_id" if topic == "items" else "user_id"
        for p, rows in got.items():
            # each partition holds its keys' events in emission order
            want = [r for r in expected[topic] if partition_of(r[key], 3) == p]
            assert rows == want, (topic, p)
        assert sum(len(r) for r in got.values()) == len(expected[topic])


@pytest.mark.integration
def test_kafka_single_event_messages_are_keyed_by_user(broker: str, topic_factory) -> None:  # type: ignore[no-untyped-def]
    from tessera.topics import read_to_end

    cfg = dataclasses.replace(
        SMALL, total_views=300, n_items=50, n_users=40, duration_ms=HOUR, late_fraction=0.0
    )
    names = {t: topic_factory(partitions=2, prefix=f"synth1-{t}") for t in TOPICS}
    summary = write_to_kafka(cfg, broker, batch_events=1, topics=names)
    msgs = list(read_to_end(broker, names["views"]))
    assert len(msgs) == summary.counts["views"] == 300
    for m in msgs:
        rec = columns_to_records(decode_message(m.value(), "views"))[0]
        assert m.key() == rec["user_id"].encode()


def test_create_topics_creates_the_dead_letter_topic_too(tmp_path) -> None:
    """``generate --create-topics`` on an empty broker leaves one a worker can start on:
    the dead-letter topic exists beside the event topics."""
    from tessera.broker import EmbeddedBroker
    from tessera.topics import list_topics

    cfg = dataclasses.replace(SMALL, malformed_fraction=0.0)
    with EmbeddedBroker(state_dir=tmp_path / "broker") as info:
        write_to_kafka(cfg, info.bootstrap, create_topics=True, partitions=2)
        topics = list_topics(info.bootstrap)
    assert {"views", "engagements", "impressions", "items", "deadletter"} <= set(topics)
