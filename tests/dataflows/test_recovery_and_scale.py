"""Crash recovery and scale-out of the blocks flow, run as real `tessera worker` processes.

* crash: kill -9 a worker mid-stream, restart it from its recovery directory, and the
  store must equal the oracle (no loss, no double count);
* scale: one worker, `-w 2`, and two processes (`-i/-a`) give the same store contents.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from features.aggregations import build_aggregation
from features.spec_loader import load_features
from features.store import open_store
from tessera.broker import find_free_port
from tests.dataflows.flowcheck import (
    LATENESS_MS,
    compare_to_oracle,
    entity_ids_of,
    expiry_for,
    oracle_for,
    produce_world,
    small_world,
    store_blocks,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
FEATURES = load_features("features.yaml")
TESSERA = [sys.executable, "-m", "tessera.cli"]


def _worker_cmd(bootstrap: str, store_url: str, *extra: str) -> list[str]:
    return [*TESSERA, "--log-level", "WARNING", "worker", "blocks", "--bootstrap", bootstrap,
            "--store", store_url, "--bounded", "--shards", "3",
            "--lateness", f"{LATENESS_MS}ms", *extra]


def _run(cmd: list[str], log: Path, timeout: float = 300) -> None:
    with log.open("ab") as out:
        proc = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_kill_9_mid_stream_then_restart_matches_oracle(fresh_broker, tmp_path):
    world = small_world(total_views=100_000, n_users=400, n_items=2_000, seed=5)
    produce_world(fresh_broker, world, batch_events=50)
    store_url = f"lmdb://{tmp_path}/store"
    recovery = tmp_path / "recovery"
    # small polls and frequent flushes (also while catching up): many epochs, snapshots and
    # writes mid-stream, so the kill lands between them
    cmd = _worker_cmd(fresh_broker, store_url, "--recovery-dir", str(recovery),
                      "--epoch-interval", "0.2", "--flush-interval", "100ms",
                      "--catchup-flush-interval", "100ms", "--batch-messages", "20")
    log = tmp_path / "worker.log"

    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    # wait until the worker has written blocks and taken snapshots, then kill it hard
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        if _has_blocks(store_url):
            time.sleep(0.3)  # a few epochs (0.2 s) in: snapshots exist, input is not done
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the worker finished before it could be killed: make the world bigger"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    _run(cmd, log)  # resume from the recovery directory and run to the end

    oracle = oracle_for(fresh_broker, world, FEATURES)
    got = store_blocks(store_url, FEATURES, entity_ids_of(oracle, FEATURES))
    assert compare_to_oracle(got, oracle, FEATURES, expiry_for(store_url, FEATURES)) == []


def _has_blocks(store_url: str) -> bool:
    try:
        with open_store(store_url, readonly=True) as store:
            return bool(store.get_watermarks("blocks/"))
    except Exception:
        return False


def test_one_worker_two_workers_and_two_processes_agree(fresh_broker, tmp_path):
    world = small_world(total_views=6_000, seed=9)
    produce_world(fresh_broker, world)
    oracle = oracle_for(fresh_broker, world, FEATURES)
    ids = entity_ids_of(oracle, FEATURES)

    one = f"lmdb://{tmp_path}/one"
    _run(_worker_cmd(fresh_broker, one), tmp_path / "one.log")

    two = f"lmdb://{tmp_path}/two"
    _run(_worker_cmd(fresh_broker, two, "-w", "2"), tmp_path / "two.log")

    cluster = f"lmdb://{tmp_path}/cluster"
    ports = [find_free_port(), find_free_port()]
    addrs = [a for p in ports for a in ("-a", f"127.0.0.1:{p}")]
    procs = []
    for i in range(2):
        log = (tmp_path / f"cluster{i}.log").open("ab")
        procs.append(subprocess.Popen(_worker_cmd(fresh_broker, cluster, *addrs, "-i", str(i)),
                                      stdout=log, stderr=subprocess.STDOUT))
    for i, p in enumerate(procs):
        assert p.wait(timeout=300) == 0, (tmp_path / f"cluster{i}.log").read_text()[-3000:]

    blocks = {name: store_blocks(url, FEATURES, ids)
              for name, url in (("one", one), ("two", two), ("cluster", cluster))}
    expired = expiry_for(one, FEATURES)
    for name, got in blocks.items():
        assert compare_to_oracle(got, oracle, FEATURES, expired) == [], name
        blocks[name] = {k: v for k, v in got.items() if not expired(k)}
    # Exact aggregations: byte-identical. Sketches depend on the order events meet inside a
    # block (HLL list mode keeps insertion order, KLL compaction is randomized): compare them
    # as sketches (same estimate for HLL; within the rank error for KLL, done above).
    specs = {f.key: f for f in FEATURES.features}
    for name in ("two", "cluster"):
        assert set(blocks[name]) == set(blocks["one"]), name
        for key, rep in blocks["one"].items():
            kind = specs[key[0]].aggregation
            if kind == "approx_quantile":
                continue
            if kind == "approx_distinct":
                agg = build_aggregation(specs[key[0]])
                assert agg.finalize(agg.from_bytes(blocks[name][key])) == agg.finalize(
                    agg.from_bytes(rep)), (name, key)
            else:
                assert blocks[name][key] == rep, (name, key)
