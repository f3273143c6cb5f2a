"""Sample records of every topic and hypothesis strategies for generated ones."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

INT32 = st.integers(-(2**31), 2**31 - 1)
INT64 = st.integers(-(2**63), 2**63 - 1)
TEXT = st.text(max_size=12)

SAMPLES: dict[str, dict[str, Any]] = {
    "views": {
        "event_id": "v-1",
        "event_ts": 1_700_000_000_123,
        "user_id": "u1",
        "item_id": "i9",
        "author_id": "a3",
        "topic": "cats",
        "surface": "follow",
        "dwell_ms": 2500,
        "position": 4,
        "request_id": "req-7",
    },
    "engagements": {
        "event_id": "g-1",
        "event_ts": 1_700_000_000_456,
        "impression_id": "imp-1",
        "user_id": "u1",
        "item_id": "i9",
        "author_id": "a3",
        "topic": "cats",
        "action": "like",
        "dwell_ms": 0,
    },
    "impressions": {
        "impression_id": "imp-1",
        "event_id": "imp-1",
        "event_ts": 1_700_000_000_000,
        "request_id": "req-7",
        "user_id": "u1",
        "item_id": "i9",
        "author_id": "a3",
        "topic": "cats",
        "position": 2,
        "feed_type": "EXPLORE",
        "source": "hnsw",
        "model_versions": {"l1": "v3", "l2": "v8"},
        "scores": {"l1": 0.25, "l2": 0.75},
        "features": {"item_view_count_6h": 12.0, "ctr_1d": 0.031},
        "feature_watermark": 1_699_999_800_000,
    },
    "items": {
        "event_id": "it-1",
        "event_ts": 1_700_000_000_000,
        "item_id": "i9",
        "author_id": "a3",
        "topic": "cats",
        "created_ts": 1_699_000_000_000,
        "op": "updated",
    },
    "deadletter": {
        "failed_ts": 1_700_000_000_999,
        "topic": "views",
        "partition": 3,
        "offset": 12345,
        "reason": "bad magic byte 0x7b",
        "stage": "decode",
        "key": b"u1",
        "payload": b'{"not": "avro"}',
    },
}


def sample(topic: str, **changes: Any) -> dict[str, Any]:
    """Return a copy of the sample record of ``topic`` with ``changes`` applied."""
    return {**SAMPLES[topic], **changes}


VIEWS = st.fixed_dictionaries(
    {
        "event_id": TEXT,
        "event_ts": INT64,
        "user_id": st.sampled_from(["u1", "u2", "u3"]) | TEXT,
        "item_id": TEXT,
        "author_id": TEXT,
        "topic": st.sampled_from(["cats", "dogs", ""]),
        "surface": st.sampled_from(["explore", "follow", "nearby"]),
        "dwell_ms": INT64,
        "position": INT32,
        "request_id": st.none() | TEXT,
    }
)

ENGAGEMENTS = st.fixed_dictionaries(
    {
        "event_id": TEXT,
        "event_ts": INT64,
        "impression_id": TEXT,
        "user_id": TEXT,
        "item_id": TEXT,
        "author_id": TEXT,
        "topic": TEXT,
        "action": st.sampled_from(["click", "like", "share", "save", "hide"]),
        "dwell_ms": INT64,
    }
)

STRATEGIES = {"views": VIEWS, "engagements": ENGAGEMENTS}
