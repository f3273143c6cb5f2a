"""Valid records of every topic: the seeds the byte-level mutations start from."""

from __future__ import annotations

from typing import Any

RECORDS: dict[str, list[dict[str, Any]]] = {
    "views": [
        {"event_id": "v-1", "event_ts": 1_700_000_000_123, "user_id": "u1", "item_id": "i9",
         "author_id": "a3", "topic": "cats", "surface": "follow", "dwell_ms": 2500,
         "position": 4, "request_id": "req-7"},
        {"event_id": "v-2", "event_ts": 1_700_000_000_500, "user_id": "u2", "item_id": "i9",
         "author_id": "a3", "topic": "dogs", "surface": "explore", "dwell_ms": 0,
         "position": 0, "request_id": None},
    ],
    "engagements": [
        {"event_id": "g-1", "event_ts": 1_700_000_000_456, "impression_id": "imp-1",
         "user_id": "u1", "item_id": "i9", "author_id": "a3", "topic": "cats",
         "action": "like", "dwell_ms": 0},
        {"event_id": "g-2", "event_ts": 1_700_000_000_999, "impression_id": "imp-2",
         "user_id": "u2", "item_id": "i8", "author_id": "", "topic": "",
         "action": "click", "dwell_ms": 1200},
    ],
    "impressions": [
        {"impression_id": "imp-1", "event_id": "imp-1", "event_ts": 1_700_000_000_000,
         "request_id": "req-7", "user_id": "u1", "item_id": "i9", "author_id": "a3",
         "topic": "cats", "position": 2, "feed_type": "EXPLORE", "source": "hnsw",
         "model_versions": {"l1": "v3", "l2": "v8"}, "scores": {"l1": 0.25, "l2": 0.75},
         "features": {"item_views_6h": 12.0, "item_ctr_1d": 0.031},
         "feature_watermark": 1_699_999_800_000},
        {"impression_id": "imp-2", "event_id": "imp-2", "event_ts": 1_700_000_000_001,
         "request_id": "req-7", "user_id": "u1", "item_id": "i8", "position": 3,
         "feature_watermark": 1_699_999_800_000},
    ],
    "items": [
        {"event_id": "it-1", "event_ts": 1_700_000_000_000, "item_id": "i9", "author_id": "a3",
         "topic": "cats", "created_ts": 1_699_000_000_000, "op": "updated"},
        {"event_id": "it-2", "event_ts": 1_700_000_000_000, "item_id": "i8", "author_id": "a4",
         "topic": "dogs", "created_ts": 1_699_000_000_000, "op": "deleted"},
    ],
    "deadletter": [
        {"failed_ts": 1_700_000_000_999, "topic": "views", "partition": 3, "offset": 12345,
         "reason": "bad magic byte 0x7b", "stage": "decode", "key": b"u1",
         "payload": b'{"not": "avro"}'},
    ],
}

EVENT_TOPICS: tuple[str, ...] = ("views", "engagements", "impressions", "items")
