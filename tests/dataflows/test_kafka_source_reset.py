"""The tailing Kafka source checks its position after a broker error, in-process.

A broker error (``error_cb``) makes a tail partition drop its consumer and check, with a probe
consumer, that the last message it emitted is still in the log. An intact log (even where
Tansu's high watermark sits below the position: multi-record batches) resumes where it was;
a log that started over (the topic recreated) is read again from its start, once.
"""

from __future__ import annotations

import pickle
import time

import pytest
from structlog.testing import capture_logs

from dataflows.kafka_source import KafkaBatchSource, PartitionCursor, SourceBatch
from schemas.columnar import columns_to_records, encode_batch, records_to_columns
from tessera.topics import create_topics, delete_topics, producer_config

pytestmark = [pytest.mark.integration]


def _views(tag: str, n: int, ts: int) -> list[dict]:
    return [{"event_id": f"{tag}-{j}", "event_ts": ts + j, "user_id": "u", "item_id": "i",
             "author_id": "a", "topic": "t", "dwell_ms": 1, "request_id": None}
            for j in range(n)]


def _produce(bootstrap: str, messages: list[list[dict]], partition: int = 0) -> None:
    """Each list of views is one message; all are produced together (multi-record batches)."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    for views in messages:
        producer.produce("views", encode_batch(records_to_columns("views", views)),
                         partition=partition)
    assert producer.flush(15) == 0


def _part(bootstrap: str):
    source = KafkaBatchSource(bootstrap=bootstrap, topics=["views"], lateness=60_000)
    return source.build_part("kafka", "views:0", None)


def _read(part, until, timeout: float = 60.0) -> list[SourceBatch]:
    """Call ``next_batch`` until ``until(batches so far)``; return the non-empty batches."""
    out: list[SourceBatch] = []
    deadline = time.monotonic() + timeout
    while not until(out):
        assert time.monotonic() < deadline, f"timed out; cursor {part.snapshot()}"
        out += [b for b in part.next_batch() if b.next_offset > b.first_offset]
    return out


def _ids(batches: list[SourceBatch]) -> list[str]:
    return [r["event_id"] for b in batches for r in columns_to_records(b.columns)]


def test_intact_log_resumes_where_it_was_after_a_broker_error(fresh_broker):
    ts = int(time.time() * 1000)
    _produce(fresh_broker, [_views(f"a{k}", 3, ts) for k in range(20)])
    _produce(fresh_broker, [_views(f"b{k}", 3, ts + 100) for k in range(5)])
    part = _part(fresh_broker)
    try:
        got = _read(part, lambda out: part.snapshot().offset >= 25)
        assert len(_ids(got)) == 75
        cursor = part.snapshot()
        assert cursor.offset == 25 and cursor.last_fp is not None

        part._suspect = True  # as error_cb does on a transport error
        with capture_logs() as logs:
            _read(part, lambda out: not part._suspect)
            assert part.snapshot() == cursor
            part._quiet_since = 0.0  # the idle check too finds the log intact
            assert part.next_batch() == []
            assert not part._suspect
        assert not [e for e in logs if e["event"] == "source.log_reset"]

        _produce(fresh_broker, [_views("c", 4, ts + 200)])
        more = _read(part, lambda out: bool(out))
        assert more[0].first_offset == 25
        assert not any(b.log_reset for b in more)
        assert _ids(more) == [f"c-{j}" for j in range(4)]
    finally:
        part.close()


@pytest.mark.parametrize(("new_messages", "flush_each"),
                         [(2, False), (12, False), (12, True)],
                         ids=["shorter", "longer", "longer-one-batch-each"])
def test_recreated_topic_is_read_again_from_its_start(fresh_broker, new_messages, flush_each):
    ts = int(time.time() * 1000)
    _produce(fresh_broker, [_views(f"old{k}", 2, ts) for k in range(8)])
    part = _part(fresh_broker)
    try:
        _read(part, lambda out: part.snapshot().offset >= 8)
        max_ts = part.snapshot().max_ts
        # a broker error: the consumer goes at once (librdkafka must not fetch the new topic
        # under the old topic id), then the topic starts over
        part._suspect = True
        part._drop_consumer()
        delete_topics(fresh_broker, ["views"])
        create_topics(fresh_broker, ["views"], partitions=3)
        new = [_views(f"new{k}", 2, ts + 1000) for k in range(new_messages)]
        # one batch each: the high watermark is the true end, past the old position, so the
        # probe reads the message at the old position - 1 and finds a different one
        for chunk in ([m] for m in new) if flush_each else [new]:
            _produce(fresh_broker, chunk)

        with capture_logs() as logs:
            got = _read(part, lambda out: len(_ids(out)) >= 2 * new_messages)
        resets = [e for e in logs if e["event"] == "source.log_reset"]
        assert [(e["topic"], e["partition"], e["old_offset"], e["new_offset"])
                for e in resets] == [("views", 0, 8, 0)]
        assert got[0].first_offset == 0
        # the first batch of the new log says so (the archive lets its offsets go back)
        assert got[0].log_reset and not any(b.log_reset for b in got[1:])
        ids = _ids(got)
        assert ids == [f"new{k}-{j}" for k in range(new_messages) for j in range(2)]
        assert part.snapshot().max_ts >= max_ts  # the watermark does not go back
    finally:
        part.close()


def test_cursor_snapshots_from_before_the_fingerprint_still_load():
    old = PartitionCursor.__new__(PartitionCursor)
    old.__dict__.update(offset=7, max_ts=123)  # what an older pickle restores
    cursor = pickle.loads(pickle.dumps(old))
    assert (cursor.offset, cursor.max_ts, cursor.last_fp) == (7, 123, None)
