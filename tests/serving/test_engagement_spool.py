"""Engagements posted to serving are as loss-free as impressions: with the broker away past
the producer's message timeout they spool to disk with their keys, and when it returns each
arrives exactly once, keyed as it was sent."""

from __future__ import annotations

import time

import pytest

from schemas.codec import decode, encode
from serving.forward_log import EngagementForwarder, pack_keyed, unpack_keyed
from tessera.broker import EmbeddedBroker, find_free_port
from tessera.topics import create_topics, read_to_end


def _engagement(i: int) -> tuple[bytes, bytes]:
    rec = {"event_id": f"e-{i}", "event_ts": 1_790_000_000_000 + i, "impression_id": f"imp-{i}",
           "user_id": f"u{i % 3}", "item_id": f"i{i}", "action": "click"}
    return rec["user_id"].encode(), encode("engagements", rec)


def _arrived(bootstrap: str) -> list[tuple[bytes, str]]:
    return [(m.key(), decode(m.value(), topic="engagements")[1]["event_id"])
            for m in read_to_end(bootstrap, "engagements")]


def test_a_key_survives_the_spool_none_apart_from_empty():
    for key in (None, b"", b"u1", bytes(range(256)) * 3):
        assert unpack_keyed(pack_keyed(key, b"value")) == (key, b"value")


@pytest.mark.integration
def test_engagements_spool_while_the_broker_is_down_and_arrive_once_with_their_keys(tmp_path):
    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
    bootstrap = broker.start().bootstrap
    create_topics(bootstrap, ["engagements"], partitions=2)
    forwarder = EngagementForwarder(bootstrap, tmp_path / "spool", drain_interval_s=0.5)
    try:
        for i in range(3):
            forwarder.send(*_engagement(i))
        forwarder.flush()
        assert sorted(_arrived(bootstrap)) == sorted(
            (f"u{i % 3}".encode(), f"e-{i}") for i in range(3))

        broker.stop(timeout_s=2)
        t0 = time.monotonic()
        for i in range(3, 13):
            forwarder.send(*_engagement(i))
        assert time.monotonic() - t0 < 0.5  # the request never waits on Kafka
        deadline = time.monotonic() + 30  # the producer's message timeout is 5 s
        while forwarder.spool.pending() < 10 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert forwarder.spool.pending() == 10  # all ten on disk, none dropped

        broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
        broker.start()
        create_topics(bootstrap, ["engagements"], partitions=2)
        deadline = time.monotonic() + 40
        got: list[tuple[bytes, str]] = []
        while time.monotonic() < deadline:
            forwarder.drain_now()
            got = _arrived(bootstrap)
            if len(got) >= 10 and forwarder.spool.pending() == 0:
                break
            time.sleep(0.5)
        assert sorted(got) == sorted((f"u{i % 3}".encode(), f"e-{i}") for i in range(3, 13))
        assert forwarder.spool.pending() == 0
    finally:
        forwarder.close(timeout_s=2)
        broker.stop(timeout_s=1)
