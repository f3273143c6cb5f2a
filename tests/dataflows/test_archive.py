"""The raw archive: RawTables (offsets in the snapshot summary) and the archive dataflow.

* RawTables unit checks: schema, offset merging across writers, conflicts, half-open scans;
* bounded run: every valid event is in its raw table exactly once, malformed ones are dead
  letters; a second run appends nothing;
* kill -9 mid-stream, restart: still exactly once (no duplicates, no gaps);
* ``-w 2``: the same exactly-once result with two workers committing the same tables.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from dataflows.archive import ArchiveFlowConfig, build_archive_flow
from dataflows.runner import run_flow
from features.offline.raw import OffsetConflictError, RawTables
from schemas.codec import DeadLetter
from schemas.columnar import records_to_columns
from schemas.registry import TOPICS
from tessera.synth import generate_records
from tessera.topics import read_to_end
from tests.dataflows.flowcheck import produce_world, small_world

HOUR = 3_600_000
DAY = 24 * HOUR
T0 = 1_700_000_000_000 - 1_700_000_000_000 % DAY  # a UTC midnight


def _views(ts: list[int]) -> list[dict]:
    return [{"event_id": f"e{i}", "event_ts": t, "user_id": f"u{i % 3}", "item_id": "i1",
             "author_id": "a1", "topic": "cats", "request_id": None if i % 2 else "r"}
            for i, t in enumerate(ts)]


# ---------------------------------------------------------------- RawTables


def test_raw_tables_schema_partitioning_and_round_trip(tmp_path):
    raw = RawTables.open(tmp_path / "wh")
    impressions = raw.table("impressions").schema()
    assert str(impressions.find_field("scores").field_type) == "map<string, double>"
    assert str(impressions.find_field("model_versions").field_type) == "map<string, string>"
    assert not raw.table("views").schema().find_field("request_id").required
    assert str(raw.table("engagements").schema().find_field("action").field_type) == "string"
    assert [f.name for f in raw.table("items").spec().fields] == ["event_date", "event_hour"]

    recs = [{"impression_id": f"m{i}", "event_id": f"m{i}", "event_ts": T0 + i * HOUR,
             "request_id": "r", "user_id": "u", "item_id": "i", "position": i,
             "scores": {"l1": 0.5 * i}, "model_versions": {"l2": "v3"},
             "feature_watermark": T0} for i in range(4)]
    cols = records_to_columns("impressions", recs)
    raw.append("impressions", cols, np.array([0, 0, 1, 1]), np.array([5, 5, 9, 10]), {0: 6, 1: 11})
    back = raw.scan_columns("impressions")
    assert back.equals(cols)
    table = raw.scan("impressions", columns=["event_id", "_partition", "_offset", "event_hour"])
    assert table.sort_by("event_id").to_pydict() == {
        "event_id": ["m0", "m1", "m2", "m3"], "_partition": [0, 0, 1, 1],
        "_offset": [5, 5, 9, 10], "event_hour": [0, 1, 2, 3]}


def test_offsets_merge_across_writers_and_conflicts_are_refused(tmp_path):
    a = RawTables.open(tmp_path / "wh")
    b = RawTables.open(tmp_path / "wh")  # another writer (same catalog)
    assert a.committed_offsets("views") == {}
    cols = records_to_columns("views", _views([T0, T0 + 1]))
    a.append("views", cols, np.array([0, 0]), np.array([0, 1]), {0: 2},
             expected_offsets={0: None})
    b.append("views", cols.take([0]), np.array([2]), np.array([7]), {2: 8})
    # b's commit keeps a's partition 0; an offsets-only commit (dead letters) moves partition 1
    a.append("views", cols.take([]), np.zeros(0), np.zeros(0), {1: 4})
    assert b.committed_offsets("views") == {0: 2, 1: 4, 2: 8}
    assert a.count_rows("views") == 3

    with pytest.raises(OffsetConflictError, match="partition 0 is committed at offset 2, but "
                       "this writer expected None"):
        b.append("views", cols, np.array([0, 0]), np.array([0, 1]), {0: 2},
                 expected_offsets={0: None})
    with pytest.raises(OffsetConflictError, match="would move it back to 1"):
        b.append("views", cols.take([0]), np.array([2]), np.array([0]), {2: 1})
    assert a.count_rows("views") == 3  # refused commits wrote nothing
    # after the broker's log was reset (an empty embedded broker), offsets may go back
    b.append("views", cols.take([0]), np.array([2]), np.array([0]), {2: 1},
             expected_offsets={2: 8}, reset_partitions={2})
    assert a.committed_offsets("views") == {0: 2, 1: 4, 2: 1}
    assert a.count_rows("views") == 4


def test_scan_is_half_open_on_event_ts_across_days(tmp_path):
    raw = RawTables.open(tmp_path / "wh")
    ts = [T0 - 1, T0, T0 + DAY - 1, T0 + DAY, T0 + 2 * DAY]
    cols = records_to_columns("views", _views(ts))
    raw.append("views", cols, np.zeros(5), np.arange(5), {0: 5})

    def ids(lo, hi):
        return sorted(raw.scan("views", lo, hi, columns=["event_id"])["event_id"].to_pylist())

    assert ids(T0, T0 + DAY) == ["e1", "e2"]
    assert ids(T0 + DAY - 1, T0 + DAY + 1) == ["e2", "e3"]
    assert ids(None, T0) == ["e0"]
    assert ids(T0 + DAY, None) == ["e3", "e4"]
    assert raw.scan_columns("views", T0, T0 + 2 * DAY).values("event_id").tolist() == \
        ["e1", "e2", "e3"]


# ---------------------------------------------------------------- the dataflow


def _archived_ids(warehouse: Path) -> dict[str, Counter]:
    raw = RawTables.open(warehouse)
    return {t: Counter(raw.scan(t, columns=["event_id"])["event_id"].to_pylist()) for t in TOPICS}


def _expected_ids(world) -> dict[str, Counter]:
    return {t: Counter(r["event_id"] for r in recs) for t, recs in generate_records(world).items()}


def _assert_exactly_once(warehouse: Path, world) -> None:
    got, want = _archived_ids(warehouse), _expected_ids(world)
    for t in TOPICS:
        assert sum(want[t].values()) > 0, t
        dupes = {k: n for k, n in got[t].items() if n > 1}
        assert not dupes, f"{t}: {len(dupes)} duplicated event ids, e.g. {list(dupes)[:3]}"
        missing = want[t] - got[t]
        assert not missing, f"{t}: {sum(missing.values())} events missing"
        assert got[t] == want[t], t


@pytest.mark.integration
def test_bounded_archive_exactly_once_dead_letters_and_rerun_appends_nothing(fresh_broker,
                                                                           tmp_path):
    world = small_world(malformed_fraction=0.02)
    summary = produce_world(fresh_broker, world)
    warehouse = tmp_path / "wh"
    config = ArchiveFlowConfig(bootstrap=fresh_broker, warehouse=warehouse, bounded=True)
    run_flow(build_archive_flow(config))

    _assert_exactly_once(warehouse, world)
    dead = [DeadLetter.decode(m.value()) for m in read_to_end(fresh_broker, "deadletter")]
    assert len(dead) == summary.total_malformed > 0
    assert all(d.reason and d.stage == "decode" for d in dead)

    raw = RawTables.open(warehouse)
    offsets = {t: raw.committed_offsets(t) for t in TOPICS}
    assert all(set(o) == {0, 1, 2} for o in offsets.values()), offsets
    snapshots = {t: raw.table(t).current_snapshot().snapshot_id for t in TOPICS}

    run_flow(build_archive_flow(config))  # resumes at the end: nothing to do
    assert {t: raw.table(t).current_snapshot().snapshot_id for t in TOPICS} == snapshots
    assert {t: raw.committed_offsets(t) for t in TOPICS} == offsets
    assert len(list(read_to_end(fresh_broker, "deadletter", idle_timeout_s=2))) == len(dead)


@pytest.mark.integration
def test_two_workers_archive_exactly_once(fresh_broker, tmp_path):
    world = small_world(seed=3, total_views=2_000, malformed_fraction=0.0)
    produce_world(fresh_broker, world, batch_events=50)
    warehouse = tmp_path / "wh"
    config = ArchiveFlowConfig(bootstrap=fresh_broker, warehouse=warehouse, bounded=True,
                               commit_interval_ms=100)
    run_flow(build_archive_flow(config), workers=2)
    _assert_exactly_once(warehouse, world)
    raw = RawTables.open(warehouse)
    assert all(set(raw.committed_offsets(t)) == {0, 1, 2} for t in TOPICS)


ARCHIVE = [sys.executable, "-c",
           "from tessera.commands.archive import archive_command; archive_command()"]


@pytest.mark.integration
@pytest.mark.slow
def test_kill_9_mid_stream_then_restart_is_exactly_once(fresh_broker, tmp_path):
    world = small_world(seed=5, total_views=40_000, n_users=300, n_items=1_000,
                        malformed_fraction=0.0)
    produce_world(fresh_broker, world, batch_events=20)
    total = sum(sum(c.values()) for c in _expected_ids(world).values())
    warehouse = tmp_path / "wh"
    cmd = [*ARCHIVE, "--bootstrap", fresh_broker, "--warehouse", str(warehouse), "--bounded",
           "--commit-interval", "200ms"]
    log = tmp_path / "archive.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).parents[2])
    raw = None
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            raw = raw or RawTables.open(warehouse)
            if any(raw.committed_offsets(t) for t in TOPICS):
                break
        except Exception:  # the catalog may not exist yet
            pass
        time.sleep(0.05)
    assert proc.poll() is None, (
        "the archive finished before it could be killed: make the world bigger\n"
        + log.read_text()[-3000:])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert raw is not None
    at_kill = sum(raw.count_rows(t) for t in TOPICS)
    assert 0 < at_kill < total, (at_kill, total)  # killed mid-run, after a commit

    with log.open("ab") as out:
        done = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, timeout=120,
                              cwd=Path(__file__).parents[2])
    assert done.returncode == 0, log.read_text()[-3000:]
    _assert_exactly_once(warehouse, world)
    assert "archive_commit" in log.read_text()


@pytest.mark.integration
def test_tail_commits_on_time_while_idle(fresh_broker, tmp_path):
    # Once the topics are drained no batch arrives: idle ticks must still trigger the commit.
    world = small_world(seed=7, total_views=500, malformed_fraction=0.0)
    produce_world(fresh_broker, world)
    total = sum(sum(c.values()) for c in _expected_ids(world).values())
    warehouse = tmp_path / "wh"
    cmd = [*ARCHIVE, "--bootstrap", fresh_broker, "--warehouse", str(warehouse), "--tail",
           "--commit-interval", "300ms", "--max-batch-events", "1000000"]
    log = tmp_path / "archive.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 30
        archived = 0
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                archived = sum(RawTables.open(warehouse).count_rows(t) for t in TOPICS)
            except Exception:  # the catalog may not exist yet
                archived = 0
            if archived >= total:
                break
            time.sleep(0.1)
        assert proc.poll() is None, log.read_text()[-3000:]  # still tailing
        assert archived == total, (archived, total, log.read_text()[-3000:])
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    _assert_exactly_once(warehouse, world)
