"""Fuzzing the whole blocks flow: a stream mixing valid single events and batch envelopes with
random bytes, truncated and corrupted messages, big messages, messages of the wrong schema,
future-dated and duplicated events, read by the real flow on the real broker.

The oracle is the decoder itself: every message it rejects must be in the dead-letter topic
with a reason, every future-dated event too (the flow refuses to let it move the watermark),
and the blocks in the store must equal the brute-force reference over exactly the events that
were accepted (duplicates are counted as delivered: exactly once is per Kafka offset)."""

from __future__ import annotations

import random
import time

import pytest
import yaml
from confluent_kafka import Producer

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from features.reference import reference_blocks
from features.spec_loader import parse_features
from schemas.codec import DeadLetter, encode
from schemas.columnar import columns_to_records, decode_message, encode_batch, records_to_columns
from schemas.errors import SchemaError
from tessera.topics import producer_config, read_to_end
from tests.dataflows.flowcheck import compare_to_oracle, entity_ids_of, expiry_for, store_blocks

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SPEC = """
features:
  - name: item_views
    source: views
    entity: item_id
    aggregation: count
    windows: [1h, 1d]
  - name: user_dwell_max
    source: views
    entity: user_id
    aggregation: max
    value: dwell_ms
    windows: [1d]
  - name: item_viewers
    source: views
    entity: item_id
    aggregation: approx_distinct
    value: user_id
    windows: [1d]
"""
LATENESS_MS = 60_000
HOUR = 3_600_000


def _view(rng: random.Random, k: int, ts: int) -> dict:
    return {"event_id": f"fz-{k}", "event_ts": ts, "user_id": f"u{rng.randrange(20)}",
            "item_id": f"i{rng.randrange(30)}", "author_id": "a1", "topic": "t1",
            "surface": "explore", "dwell_ms": rng.randrange(0, 60_000), "position": 0,
            "request_id": None}


def _mixed_stream(rng: random.Random, n: int) -> list[bytes]:
    """``n`` messages for one partition of ``views``, in order (event time increasing)."""
    now = int(time.time() * 1000)
    ts = now - 3 * HOUR
    sent: list[bytes] = []
    out: list[bytes] = []
    for k in range(n):
        ts += rng.randrange(1, 20_000)
        kind = rng.choices(
            ["single", "batch", "random", "truncated", "corrupted", "big", "wrong_schema",
             "future", "duplicate"],
            weights=[30, 15, 8, 8, 8, 3, 6, 8, 8])[0]
        if kind == "single":
            msg = encode("views", _view(rng, k, ts))
        elif kind == "batch":
            recs = [_view(rng, k * 1000 + j, ts + j) for j in range(rng.randrange(1, 30))]
            if rng.random() < 0.3:  # one future-dated event inside an envelope
                recs[rng.randrange(len(recs))]["event_ts"] = now + 30 * 24 * HOUR
            msg = encode_batch(records_to_columns("views", recs))
        elif kind == "random":
            msg = rng.randbytes(rng.randrange(0, 200))
        elif kind == "truncated":
            full = encode("views", _view(rng, k, ts))
            msg = full[: rng.randrange(0, len(full))]
        elif kind == "corrupted":
            full = bytearray(encode_batch(records_to_columns(
                "views", [_view(rng, k * 1000 + j, ts) for j in range(3)])))
            full[rng.randrange(len(full))] = rng.randrange(256)
            msg = bytes(full)
        elif kind == "big":
            msg = encode("views", {**_view(rng, k, ts), "user_id": "u" * 500_000})
        elif kind == "wrong_schema":
            msg = encode("engagements", {"event_id": f"e{k}", "event_ts": ts,
                                         "impression_id": "imp", "user_id": "u1",
                                         "item_id": "i1", "action": "click"})
        elif kind == "future":
            msg = encode("views", _view(rng, k, now + rng.randrange(2, 48) * HOUR))
        else:
            msg = rng.choice(sent) if sent else encode("views", _view(rng, k, ts))
        out.append(msg)
        if kind in ("single", "batch"):
            sent.append(msg)
    return out


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_blocks_flow_survives_a_hostile_stream(fresh_broker, tmp_path, seed):
    features = parse_features(yaml.safe_load(SPEC))
    stream = _mixed_stream(random.Random(seed), 400)
    producer = Producer(producer_config(fresh_broker))
    for msg in stream:
        producer.produce("views", msg, partition=0)
    assert producer.flush(30) == 0

    store_url = f"lmdb://{tmp_path}/store"
    config = BlocksFlowConfig(bootstrap=fresh_broker, store_url=store_url, features=features,
                              bounded=True, shards=2, lateness_ms=LATENESS_MS)
    run_flow(build_blocks_flow(config))  # must not raise

    # the oracle: what the decoder accepts, less events too far in the future and events
    # with an id too long to be one (a store key)
    horizon = int(time.time() * 1000) + config.max_future_ms
    accepted, rejected, future, too_long = [], 0, 0, 0
    for msg in stream:
        try:
            recs = columns_to_records(decode_message(msg, "views"))
        except (SchemaError, ValueError):
            rejected += 1
            continue
        for r in recs:
            if r["event_ts"] > horizon:
                future += 1
            elif any(len((r[k] or "").encode()) > 256 for k in ("user_id", "item_id", "author_id")):
                too_long += 1
            else:
                accepted.append(r)
    assert rejected > 0 and future > 0 and too_long > 0

    dead = [DeadLetter.decode(m.value()) for m in read_to_end(fresh_broker, "deadletter")]
    assert all(d.reason for d in dead)
    assert sum(d.stage == "decode" for d in dead) == rejected
    assert sum("future-dated" in d.reason for d in dead) == future
    assert sum("not a valid id" in d.reason for d in dead) == too_long
    assert len(dead) == rejected + future + too_long

    oracle = reference_blocks(features.features, {"views:0": accepted}, LATENESS_MS)
    got = store_blocks(store_url, features, entity_ids_of(oracle, features))
    # the two empty partitions end without an event and hold no watermark back, so the
    # store's retention applies: blocks past it may be gone
    expired = expiry_for(store_url, features, LATENESS_MS)
    assert compare_to_oracle(got, oracle, features, expired) == []
    assert len(oracle) > 10
    assert sum(not expired(k) for k in oracle) > 10
