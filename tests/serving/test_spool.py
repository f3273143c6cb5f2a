"""Forward log: with the broker stopped, impressions and posted engagements spool to disk
(engagements with their keys); when it returns, every one of them arrives exactly once, and
requests never block on Kafka meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from schemas.codec import decode, encode
from schemas.columnar import columns_to_records, decode_message
from serving.forward_log import (
    EngagementForwarder,
    ForwardLog,
    ImpressionLogger,
    pack_keyed,
    unpack_keyed,
)
from tessera.broker import EmbeddedBroker, find_free_port
from tessera.topics import create_topics, read_to_end


def _imp(i: int) -> dict:
    return {"impression_id": f"imp-{i}", "event_id": f"imp-{i}", "event_ts": 1_790_000_000_000 + i,
            "request_id": f"r-{i // 5}", "user_id": "u1", "item_id": f"i{i}", "author_id": "a",
            "topic": "t", "position": i % 5, "feed_type": "EXPLORE", "source": "trending",
            "model_versions": {"l2": "v1"}, "scores": {"l2": 0.5}, "features": {"f": 1.0},
            "feature_watermark": 1_790_000_000_000}


def _logged(bootstrap: str) -> list[str]:
    out = []
    for m in read_to_end(bootstrap, "impressions"):
        out += [r["impression_id"] for r in columns_to_records(decode_message(m.value(), "impressions"))]
    return out


def _engagement(i: int) -> tuple[bytes, bytes]:
    rec = {"event_id": f"e-{i}", "event_ts": 1_790_000_000_000 + i, "impression_id": f"imp-{i}",
           "user_id": f"u{i % 3}", "item_id": f"i{i}", "action": "click"}
    return rec["user_id"].encode(), encode("engagements", rec)


def _arrived(bootstrap: str) -> list[tuple[bytes, str]]:
    return [(m.key(), decode(m.value(), topic="engagements")[1]["event_id"])
            for m in read_to_end(bootstrap, "engagements")]


@dataclass
class Outage:
    """What a forward log did across a broker stop and restart (``_through_an_outage``)."""

    before: list[Any]  # what arrived before the stop
    send_s: float  # how long the sends during the outage took
    spooled: int  # messages on disk once the producer gave up on them
    after: list[Any]  # what arrived after the restart
    left: int  # messages still on disk at the end


def _through_an_outage(tmp_path, topic: str, partitions: int,
                       make: Callable[[str, Any], ForwardLog], before: Callable[[ForwardLog], None],
                       during: Callable[[ForwardLog], None], spooled: int,
                       read: Callable[[str], list[Any]]) -> Outage:
    """Send ``before``, stop the broker, send ``during`` and wait until ``spooled`` messages
    are on disk, restart the broker (empty) and drain until they arrived."""
    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
    bootstrap = broker.start().bootstrap
    create_topics(bootstrap, [topic], partitions=partitions)
    log = make(bootstrap, tmp_path / "spool")
    try:
        before(log)
        log.flush()
        arrived_before = read(bootstrap)

        broker.stop(timeout_s=2)  # Kafka gone (the embedded broker keeps nothing on disk)
        t0 = time.monotonic()
        during(log)
        send_s = time.monotonic() - t0
        deadline = time.monotonic() + 30  # the producer's message timeout is 5 s
        while log.spool.pending() < spooled and time.monotonic() < deadline:
            time.sleep(0.2)
        on_disk = log.spool.pending()

        broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
        broker.start()
        create_topics(bootstrap, [topic], partitions=partitions)
        deadline = time.monotonic() + 40
        got: list[Any] = []
        while time.monotonic() < deadline:
            log.drain_now()
            got = read(bootstrap)
            if len(got) >= spooled and log.spool.pending() == 0:
                break
            time.sleep(0.5)
        return Outage(arrived_before, send_s, on_disk, got, log.spool.pending())
    finally:
        log.close(timeout_s=2)
        broker.stop(timeout_s=1)


@pytest.mark.integration
def test_impressions_spool_while_broker_is_down_and_arrive_once(tmp_path):
    def during(log):
        for k in range(1, 9):
            log.log([_imp(5 * k + j) for j in range(5)])

    out = _through_an_outage(
        tmp_path, "impressions", 1,
        lambda bs, spool: ImpressionLogger(bs, spool, drain_interval_s=0.5),
        lambda log: log.log([_imp(i) for i in range(5)]), during, 8, _logged)
    assert sorted(out.before) == sorted(f"imp-{i}" for i in range(5))
    assert out.send_s < 0.5  # requests never wait on Kafka
    assert out.spooled == 8  # all eight requests' messages are on disk
    assert sorted(out.after) == sorted(f"imp-{i}" for i in range(5, 45))  # each exactly once
    assert out.left == 0


def test_a_key_survives_the_spool_none_apart_from_empty():
    for key in (None, b"", b"u1", bytes(range(256)) * 3):
        assert unpack_keyed(pack_keyed(key, b"value")) == (key, b"value")


@pytest.mark.integration
def test_engagements_spool_while_the_broker_is_down_and_arrive_once_with_their_keys(tmp_path):
    def send(first: int, last: int) -> Callable[[ForwardLog], None]:
        return lambda log: [log.send(*_engagement(i)) for i in range(first, last)]

    out = _through_an_outage(
        tmp_path, "engagements", 2,
        lambda bs, spool: EngagementForwarder(bs, spool, drain_interval_s=0.5),
        send(0, 3), send(3, 13), 10, _arrived)
    assert sorted(out.before) == sorted((f"u{i % 3}".encode(), f"e-{i}") for i in range(3))
    assert out.send_s < 0.5  # the request never waits on Kafka
    assert out.spooled == 10  # all ten on disk, none dropped
    assert sorted(out.after) == sorted((f"u{i % 3}".encode(), f"e-{i}") for i in range(3, 13))
    assert out.left == 0
