"""A tailing blocks worker survives the embedded broker restarting empty on the same port.

The embedded broker (Tansu) keeps its log in memory: restarted, with the topics created
anew, every partition starts over at offset 0, below the position the worker had reached.
The worker, a real ``tessera worker blocks --tail`` process, must notice, go back to the
start of the new log, and count each new event exactly once; the events counted before the
restart must stay counted once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from features.aggregations import build_aggregation
from features.spec_loader import load_features
from features.store import open_store
from schemas.columnar import encode_batch, records_to_columns
from tessera.broker import EmbeddedBroker, find_free_port
from tessera.topics import PLATFORM_TOPICS, create_topics, producer_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
FEATURES = load_features(str(ROOT / "features.yaml"))
SPEC = next(f for f in FEATURES.features if f.name == "item_views")
AGG = build_aggregation(SPEC)


def _views(item: str, n: int, now: int) -> list[dict]:
    return [{"event_id": f"v-{item}-{j}", "event_ts": now + j, "user_id": f"u{j % 7}",
             "item_id": item, "author_id": "a", "topic": "t", "dwell_ms": 100,
             "request_id": None} for j in range(n)]


def _produce(bootstrap: str, messages: list[tuple[int, list[dict]]]) -> None:
    """Produce ``(partition, views)`` messages, each one batch envelope, in one go."""
    from confluent_kafka import Producer

    producer = Producer(producer_config(bootstrap))
    for partition, views in messages:
        producer.produce("views", encode_batch(records_to_columns("views", views)),
                         partition=partition)
    assert producer.flush(15) == 0, "the broker did not acknowledge every message"


def _count(store_url: str, item: str) -> int:
    """Views of ``item`` in the store: the sum of its finest ``item_views`` blocks."""
    with open_store(store_url, readonly=True) as store:
        [table] = store.get_block_tables("item", "views", [item])
    if table is None:
        return 0
    rows = [r for r in table.to_rows() if r[0] == SPEC.key]
    if not rows:
        return 0
    finest = min(r[2] for r in rows)
    return sum(int(AGG.finalize(AGG.from_bytes(rep))) for _, _, size, rep in rows
               if size == finest)


def _wait_for(pred: Callable[[], bool], timeout: float, every: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):  # the store may not exist yet
            if pred():
                return True
        time.sleep(every)
    return False


def test_tail_worker_counts_events_after_broker_restarted_empty_exactly_once(tmp_path):
    port = find_free_port()
    broker = EmbeddedBroker(port=port, state_dir=tmp_path / "broker")
    bootstrap = broker.start(timeout_s=30).bootstrap
    create_topics(bootstrap, PLATFORM_TOPICS, partitions=2)
    store_url = f"lmdb://{tmp_path}/store"
    log_path = tmp_path / "worker.log"
    tag = uuid.uuid4().hex[:6]
    before, after = f"before-{tag}", f"after-{tag}"
    worker = None
    try:
        with log_path.open("ab") as out:
            worker = subprocess.Popen(
                [sys.executable, "-m", "tessera.cli", "--log-level", "WARNING", "worker",
                 "blocks", "--bootstrap", bootstrap, "--store", store_url, "--tail",
                 "--topics", "views", "--shards", "2", "--flush-interval", "200ms"],
                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)

        def worker_log() -> str:
            return log_path.read_text(errors="replace")[-3000:]

        # Several messages a partition, produced together (multi-record batches: Tansu's high
        # watermark then sits below the true end), so both positions end up past the end of
        # the short logs made after the restart.
        now = int(time.time() * 1000)
        old = _views(before, 40, now)
        _produce(bootstrap, [(k % 2, old[5 * k:5 * k + 5]) for k in range(8)])
        assert _wait_for(lambda: _count(store_url, before) == 40, 120), worker_log()

        broker.stop(timeout_s=2)
        time.sleep(3)  # the worker sees the broker gone (and reconnects on its own)
        assert worker.poll() is None, worker_log()
        broker = EmbeddedBroker(port=port, state_dir=tmp_path / "broker")
        broker.start(timeout_s=30)
        create_topics(bootstrap, PLATFORM_TOPICS, partitions=2)

        new = _views(after, 30, int(time.time() * 1000))
        _produce(bootstrap, [(0, new[:25]), (1, new[25:])])
        counted = _wait_for(lambda: _count(store_url, after) >= 30, 90)
        alive = worker.poll() is None
        assert alive, f"the worker died (rc {worker.returncode}): {worker_log()}"
        assert counted, f"new events not counted ({_count(store_url, after)}): {worker_log()}"
        time.sleep(2)  # a late duplicate would show now
        assert _count(store_url, after) == 30, worker_log()
        assert _count(store_url, before) == 40, worker_log()
        assert "source.log_reset" in log_path.read_text(errors="replace")
    finally:
        if worker is not None and worker.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(worker.pid, signal.SIGKILL)
            worker.wait()
        broker.stop(timeout_s=1)
