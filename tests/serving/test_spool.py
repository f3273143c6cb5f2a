"""Forward log: with the broker stopped, impressions spool to disk; when it returns, every
one of them arrives exactly once, and requests never block on Kafka meanwhile."""

from __future__ import annotations

import time

import pytest

from schemas.columnar import columns_to_records, decode_message
from serving.forward_log import ImpressionLogger
from tessera.broker import EmbeddedBroker, find_free_port
from tessera.topics import create_topics, read_to_end

pytestmark = pytest.mark.integration


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


def test_impressions_spool_while_broker_is_down_and_arrive_once(tmp_path):
    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
    bootstrap = broker.start().bootstrap
    create_topics(bootstrap, ["impressions"], partitions=1)
    logger = ImpressionLogger(bootstrap, tmp_path / "spool", drain_interval_s=0.5)
    try:
        logger.log([_imp(i) for i in range(5)])
        logger.flush()
        assert sorted(_logged(bootstrap)) == sorted(f"imp-{i}" for i in range(5))

        broker.stop(timeout_s=2)  # Kafka gone (the embedded broker keeps nothing on disk)
        t0 = time.monotonic()
        for k in range(1, 9):
            logger.log([_imp(5 * k + j) for j in range(5)])
        assert time.monotonic() - t0 < 0.5  # requests never wait on Kafka
        deadline = time.monotonic() + 30
        while logger.spool.pending() < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert logger.spool.pending() == 8  # all eight requests' messages are on disk

        broker = EmbeddedBroker(port=port, state_dir=tmp_path / "b")
        broker.start()
        create_topics(bootstrap, ["impressions"], partitions=1)
        deadline = time.monotonic() + 40
        got: list[str] = []
        while time.monotonic() < deadline:
            logger.drain_now()
            got = _logged(bootstrap)
            if len(got) >= 40 and logger.spool.pending() == 0:
                break
            time.sleep(0.5)
        assert sorted(got) == sorted(f"imp-{i}" for i in range(5, 45))  # each exactly once
        assert logger.spool.pending() == 0
    finally:
        logger.close(timeout_s=2)
        broker.stop(timeout_s=1)
