"""The dead-letter sink sends a dead letter whose delivery failed again (real broker)."""

from __future__ import annotations

import time
import uuid

from schemas.codec import DeadLetter
from tessera.topics import create_topics, delete_topics, read_to_end


def _dead_letter(i: int) -> DeadLetter:
    return DeadLetter(topic="views", partition=0, offset=i, payload=b"\x00bad" + bytes([i]),
                      key=None, reason="test: not Avro", stage="decode", failed_ts=1_000 + i)


def test_a_failed_delivery_is_sent_again_once_the_topic_exists(broker: str) -> None:
    """The topic is missing (producers never create one): each message times out, is kept,
    and reaches the topic once it is created. Without the re-send only the third arrives."""
    from dataflows.sinks import _DeadLetterPartition

    topic = f"dlq-{uuid.uuid4().hex[:8]}"
    part = _DeadLetterPartition(broker, topic, **{"message.timeout.ms": 500})
    try:
        part.write_batch([_dead_letter(0), _dead_letter(1)])
        deadline = time.monotonic() + 10
        while len(part.failed) < 2 and time.monotonic() < deadline:
            part.producer.poll(0.1)
        assert part.delivery_failures == 2 and len(part.failed) == 2
        create_topics(broker, [topic], partitions=1)
        part.write_batch([_dead_letter(2)])  # sends the two failed ones again first
        part.close()
        assert part.failed == []
        got = sorted(DeadLetter.decode(m.value()).offset
                     for m in read_to_end(broker, topic, idle_timeout_s=5))
        assert got == [0, 1, 2]
    finally:
        delete_topics(broker, [topic])
