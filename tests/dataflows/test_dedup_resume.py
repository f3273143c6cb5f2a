"""Duplicate events across a restart: a resumed source rebuilds its event-id memory.

The ids a deduplicated partition remembers are not in its snapshot; the snapshot says where
they start in the log (``PartitionCursor.dedup_from``), and the resumed partition reads the
log again from there, admitting ids without emitting events. A retried producer's copy
sent after the restart is then dropped like one within a run.
"""

from __future__ import annotations

import dataclasses
import time

import pytest

from dataflows.kafka_source import KafkaBatchSource
from tests.dataflows.test_kafka_source_reset import _ids, _produce, _read, _views

pytestmark = [pytest.mark.integration]


def _part(bootstrap: str, cursor):
    source = KafkaBatchSource(bootstrap=bootstrap, topics=["views"], lateness=60_000,
                              deduplicate={"views": 600_000})
    return source.build_part("kafka", "views:0", cursor)


def _read_to(part, offset: int):
    batches = _read(part, lambda out: part.snapshot().offset >= offset)
    return _ids(batches), sum(b.duplicates for b in batches)


def test_a_copy_produced_after_a_restart_is_dropped(fresh_broker):
    ts = int(time.time() * 1000)
    _produce(fresh_broker, [_views(f"a{k}", 3, ts + 10 * k) for k in range(10)])
    first = _part(fresh_broker, None)
    try:
        ids, dups = _read_to(first, 10)
        cursor = first.snapshot()
    finally:
        first.close()
    assert len(ids) == 30 and dups == 0
    assert cursor.offset == 10 and cursor.dedup_from == 0

    # a producer retries message 3 after the restart, then sends new events
    _produce(fresh_broker, [_views("a3", 3, ts + 30), _views("b", 3, ts + 200)])
    resumed = _part(fresh_broker, cursor)
    try:
        ids, dups = _read_to(resumed, 12)
        assert ids == ["b-0", "b-1", "b-2"]  # nothing below offset 10 is emitted again
        assert dups == 3
        assert resumed.snapshot().dedup_from == 0
    finally:
        resumed.close()

    # the same resume without the rebuild counts the copies: what this guards against
    forgetful = _part(fresh_broker, dataclasses.replace(cursor, dedup_from=-1))
    try:
        ids, dups = _read_to(forgetful, 12)
        assert ids == ["a3-0", "a3-1", "a3-2", "b-0", "b-1", "b-2"] and dups == 0
    finally:
        forgetful.close()
