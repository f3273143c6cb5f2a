"""Table maintenance: a writer's metadata stays flat however many commits it makes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from features.offline import BlockRow, OfflineTables
from features.offline.maintenance import (
    COMMITS,
    TABLE_PROPERTIES,
    MaintenancePolicy,
    maintain,
)
from features.offline.raw import RawTables
from schemas.columnar import records_to_columns

M5 = 300_000
T0 = 1_700_006_400_000
#: maintain every 10 commits, keep only the last 2 snapshots, delete orphans at once
EAGER = MaintenancePolicy(every_commits=10, keep_last=2, grace_ms=-60_000)


def _files(root: Path, sub: str) -> list[Path]:
    return [Path(d) / f for d, _, fs in os.walk(root / sub) for f in fs]


def _table_dir(tables: OfflineTables, name: str) -> Path:
    return Path(tables.table(name).metadata.location.removeprefix("file://"))


def _row(i: int) -> BlockRow:
    return BlockRow("user", f"u{i % 7}", "views", T0 + i * M5, M5, f"{i}".encode())


def test_new_tables_carry_the_maintenance_properties(tmp_path):
    tables = OfflineTables.open(tmp_path / "wh")
    props = tables.table("blocks").properties
    assert {k: props.get(k) for k in TABLE_PROPERTIES} == dict(TABLE_PROPERTIES)


def test_metadata_stays_flat_over_many_commits(tmp_path, monkeypatch):
    monkeypatch.setattr(COMMITS, "policy", EAGER)
    tables = OfflineTables.open(tmp_path / "wh")
    root = _table_dir(tables, "blocks")
    sizes, counts = {}, {}
    for i in range(160):
        tables.append_blocks([_row(i)])
        if i + 1 in (40, 160):
            t = tables.table("blocks")
            sizes[i + 1] = os.path.getsize(t.metadata_location.removeprefix("file://"))
            counts[i + 1] = len(_files(root, "metadata"))
    t = tables.table("blocks")
    assert len(t.metadata.snapshots) <= EAGER.every_commits + EAGER.keep_last
    # small data files are merged: the live files and the data directory stay bounded too
    assert len(list(t.scan().plan_files())) <= EAGER.min_files + EAGER.every_commits
    assert len(_files(root, "data")) <= EAGER.min_files + EAGER.every_commits
    # the metadata JSON and the metadata directory do not grow with the commits
    assert sizes[160] <= sizes[40] * 1.2, sizes
    assert counts[160] <= counts[40] + 5, counts
    # every row is still there, once
    got = tables.scan_blocks()
    assert sorted(got.column("start_ms").to_pylist()) == [T0 + i * M5 for i in range(160)]


def test_files_a_replacement_removed_are_deleted_and_live_ones_kept(tmp_path):
    tables = OfflineTables.open(tmp_path / "wh")
    root = _table_dir(tables, "blocks")
    tables.append_blocks([_row(i) for i in range(10)])
    before = set(_files(root, "data"))
    tables.replace_blocks("views", T0, T0 + 10 * M5, [_row(i) for i in range(5)], sizes=[M5])
    report = maintain(tables.table("blocks"), EAGER)
    after = set(_files(root, "data"))
    assert report.files_deleted >= 1 and not (before & after)  # the replaced file is gone
    assert tables.scan_blocks().num_rows == 5
    # young orphans (a commit another process is still making) are kept
    stray = root / "data" / "stray.parquet"
    stray.write_bytes(b"x")
    maintain(tables.table("blocks"), MaintenancePolicy(keep_last=1))
    assert stray.exists()


@pytest.mark.parametrize("commits", [25])
def test_the_archive_keeps_its_offsets_through_expiry(tmp_path, monkeypatch, commits):
    monkeypatch.setattr(COMMITS, "policy", EAGER)
    raw = RawTables.open(tmp_path / "wh")
    for i in range(commits):
        rec = {"event_id": f"e{i}", "event_ts": T0 + i, "user_id": "u", "item_id": "i",
               "author_id": "a", "topic": "t", "dwell_ms": 1, "request_id": None}
        raw.append("views", records_to_columns("views", [rec]), np.zeros(1, np.int32),
                   np.array([i], np.int64), {0: i + 1})
    assert len(raw.table("views").metadata.snapshots) < commits
    assert raw.committed_offsets("views") == {0: commits}
    assert raw.scan_columns("views", T0, T0 + commits).n == commits


def test_a_scan_planned_moments_ago_keeps_its_files(tmp_path):
    """Snapshots are expired at once, but a file is deleted only once it has been
    unreferenced for the grace: a scan planned on an expired snapshot still reads."""
    import time

    tables = OfflineTables.open(tmp_path / "wh")
    for i in range(12):
        tables.append_blocks([_row(i)])
    t = tables.table("blocks")
    planned = [Path(task.file.file_path.removeprefix("file://"))
               for task in t.scan().plan_files()]
    policy = MaintenancePolicy(keep_last=1)
    report = maintain(t, policy)
    assert report.files_compacted == 12 and report.snapshots_kept == 1
    assert report.files_deleted == 0 and all(p.exists() for p in planned)
    assert tables.scan_blocks().num_rows == 12
    # once the grace has passed they go
    later = int(time.time() * 1000) + policy.grace_ms + 1
    report = maintain(tables.table("blocks"), policy, now_ms=later)
    assert report.files_deleted >= 12 and not any(p.exists() for p in planned)
    assert tables.scan_blocks().num_rows == 12


def test_an_append_based_on_a_snapshot_another_process_expired_is_retried(tmp_path):
    """Another writer expired the snapshot this one read last: pyiceberg's own retry cannot
    find its starting snapshot (ValidationException); the append is retried on a fresh read."""
    from features.offline.maintenance import expire_snapshots

    ours = OfflineTables.open(tmp_path / "wh")
    theirs = OfflineTables.open(tmp_path / "wh", catalog_key="another process")
    ours.append_blocks([_row(0)])
    stale = ours._tables["blocks"]
    stale.refresh()
    for i in range(1, 4):
        theirs.append_blocks([_row(i)])
    assert expire_snapshots(theirs.table("blocks"), MaintenancePolicy(keep_last=1)) >= 1
    refreshes = []
    real = stale.refresh

    def first_refresh_is_stale():
        refreshes.append(1)
        return stale if len(refreshes) == 1 else real()

    stale.refresh = first_refresh_is_stale
    ours.append_blocks([_row(4)])
    assert len(refreshes) >= 2  # retried on a fresh read
    assert sorted(theirs.scan_blocks().column("start_ms").to_pylist()) == \
        [T0 + i * M5 for i in range(5)]
