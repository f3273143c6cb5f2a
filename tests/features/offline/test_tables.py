"""Offline Iceberg tables: round trips, pushed-down filters, dedup, reopen, concurrent commits."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from pyiceberg.exceptions import CommitFailedException

from features.offline import BlockRow, LateEventRow, OfflineTableError, OfflineTables

DAY = 86_400_000
M5 = 300_000
H1 = 3_600_000
T0 = 1_700_006_400_000  # 2023-11-15T00:00:00Z, a day boundary


def _blocks() -> list[BlockRow]:
    """Two entities x two features x three 5m blocks, plus one 1h block and one next-day block."""
    rows = [
        BlockRow("user", eid, fk, T0 + i * M5, M5, f"{eid}/{fk}/{i}".encode())
        for eid in ("u1", "u2")
        for fk in ("views", "clicks")
        for i in range(3)
    ]
    rows.append(BlockRow("user", "u1", "views", T0, H1, b"hour"))
    rows.append(BlockRow("item", "i1", "views", T0 + DAY, M5, b"tomorrow"))
    return rows


def _keys(table) -> list[tuple]:
    return list(
        zip(
            *(
                table.column(c).to_pylist()
                for c in ("entity_type", "entity_id", "feature_key", "start_ms", "size_ms")
            ),
            strict=True,
        )
    )


@pytest.fixture
def tables(tmp_path: Path) -> OfflineTables:
    return OfflineTables.open(tmp_path / "wh")


def test_blocks_round_trip_dedupes_at_least_once_appends(tables: OfflineTables) -> None:
    rows = _blocks()
    assert tables.append_blocks(rows, written_ms=100) == len(rows)
    assert tables.append_blocks(rows, written_ms=200) == len(rows)  # replay after a crash

    got = tables.scan_blocks()

    assert tables.count_rows("blocks") == 2 * len(rows)
    assert got.num_rows == len(rows)
    assert got.column_names == [
        "entity_type",
        "entity_id",
        "feature_key",
        "start_ms",
        "size_ms",
        "rep",
        "written_ms",
    ]
    assert sorted(_keys(got)) == _keys(got)  # sorted by block key
    assert set(got.column("written_ms").to_pylist()) == {200}
    by_key = dict(zip(_keys(got), got.column("rep").to_pylist(), strict=True))
    assert {
        (r.entity_type, r.entity_id, r.feature_key, r.start_ms, r.size_ms): r.rep for r in rows
    } == by_key


def test_blocks_dedupe_keeps_latest_written(tables: OfflineTables) -> None:
    tables.append_blocks([("user", "u1", "views", T0, M5, b"new")], written_ms=300)
    tables.append_blocks([("user", "u1", "views", T0, M5, b"old")], written_ms=100)

    got = tables.scan_blocks()

    assert got.column("rep").to_pylist() == [b"new"]
    assert got.column("written_ms").to_pylist() == [300]


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"feature_keys": ["clicks"]}, 6),
        ({"feature_keys": ["clicks", "views"]}, 14),
        ({"entity_type": "item"}, 1),
        ({"size": H1}, 1),
        ({"size": M5, "entity_type": "user"}, 12),
        ({"entity_ids": ["u2"]}, 6),
        # start_from <= start_ms < start_to, half-open
        ({"start_from": T0 + M5}, 8 + 1),
        ({"start_to": T0 + M5}, 4 + 1),
        ({"start_from": T0 + M5, "start_to": T0 + 2 * M5}, 4),
        # Day-boundary edges: the day predicate must not drop the last ms of a day
        # or the block at exactly T0 + DAY.
        ({"start_from": T0 + DAY}, 1),
        ({"start_to": T0 + DAY}, 13),
        ({"start_to": T0 + DAY + 1}, 14),
        ({"start_from": T0 + DAY - 1, "start_to": T0 + DAY + 1}, 1),
        ({"feature_keys": ["views"], "start_from": T0, "start_to": T0 + M5, "size": M5}, 2),
        ({"feature_keys": []}, 0),
    ],
)
def test_scan_blocks_filters(tables: OfflineTables, filters: dict, expected: int) -> None:
    rows = _blocks()
    tables.append_blocks(rows, written_ms=1)

    got = tables.scan_blocks(**filters)

    def match(r: BlockRow) -> bool:
        return (
            ("feature_keys" not in filters or r.feature_key in filters["feature_keys"])
            and ("entity_type" not in filters or r.entity_type == filters["entity_type"])
            and ("entity_ids" not in filters or r.entity_id in filters["entity_ids"])
            and ("size" not in filters or r.size_ms == filters["size"])
            and ("start_from" not in filters or r.start_ms >= filters["start_from"])
            and ("start_to" not in filters or r.start_ms < filters["start_to"])
        )

    reference = sorted(
        (r.entity_type, r.entity_id, r.feature_key, r.start_ms, r.size_ms) for r in rows if match(r)
    )
    assert len(reference) == expected
    assert _keys(got) == reference


def test_late_events_round_trip(tables: OfflineTables) -> None:
    rows = [
        LateEventRow("views", 0, 10, T0 - 5, "e10", b"\x00\x00\x00\x00\x01abc", T0 + 1000),
        LateEventRow("views", 1, 7, T0 + DAY, "e7", b"\x00\x00\x00\x00\x01de", T0 + DAY + 5),
        LateEventRow("clicks", 0, 3, T0, "c3", b"\x00\x00\x00\x00\x02", T0 + 9),
    ]
    assert tables.append_late_events(rows) == 3
    # Re-detected after a crash: a second row for the same Kafka record.
    tables.append_late_events([rows[0]._replace(detected_ms=T0 + 2000)])

    everything = tables.scan_late_events()
    assert tables.count_rows("late_events") == 4
    assert everything.num_rows == 3
    # Sorted by (topic, partition, offset).
    assert everything.column("offset").to_pylist() == [3, 10, 7]
    assert everything.column("detected_ms").to_pylist()[1] == T0 + 2000
    assert everything.column("payload").to_pylist() == [
        rows[2].payload,
        rows[0].payload,
        rows[1].payload,
    ]

    views = tables.scan_late_events(topic="views")
    assert views.column("event_id").to_pylist() == ["e10", "e7"]
    ranged = tables.scan_late_events(from_ts=T0, to_ts=T0 + DAY)
    assert ranged.column("event_id").to_pylist() == ["c3"]
    assert tables.scan_late_events(topic="views", from_ts=T0 + DAY).column(
        "event_id"
    ).to_pylist() == ["e7"]


def test_reopen_sees_data(tmp_path: Path) -> None:
    first = OfflineTables.open(tmp_path / "wh")
    first.append_blocks(_blocks(), written_ms=1)
    first.append_late_events([("views", 0, 1, T0, "e1", b"p", T0)])

    again = OfflineTables.open(tmp_path / "wh")

    assert (tmp_path / "wh" / "catalog.db").exists()
    assert again.scan_blocks().num_rows == len(_blocks())
    assert again.scan_late_events().num_rows == 1
    # The first handle sees writes made through the second one.
    again.append_blocks([("user", "u9", "views", T0, M5, b"x")], written_ms=2)
    assert first.scan_blocks(entity_ids=["u9"]).num_rows == 1
    assert first.count_rows("blocks") == len(_blocks()) + 1


def test_empty_tables_and_empty_appends(tables: OfflineTables) -> None:
    assert tables.append_blocks([], written_ms=1) == 0
    assert tables.append_late_events([]) == 0
    assert tables.count_rows("blocks") == 0
    assert tables.scan_blocks().num_rows == 0
    assert tables.scan_late_events().num_rows == 0


def test_concurrent_writers_all_commit(tmp_path: Path) -> None:
    # Distinct catalog_key => no shared lock: the threads race and must win by retrying.
    handles = [
        OfflineTables.open(tmp_path / "wh", catalog_key=f"k{i}", commit_retries=20)
        for i in range(4)
    ]
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            for j in range(3):
                handles[i].append_blocks(
                    [("user", f"u{i}", "views", T0 + j * M5, M5, b"r")], written_ms=j
                )
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert errors == []
    assert handles[0].scan_blocks().num_rows == 12


def test_commit_retry_then_give_up(tables: OfflineTables, monkeypatch: pytest.MonkeyPatch) -> None:
    tables._backoff_s = 0.0
    table = tables._tables["blocks"]
    real_append = table.append
    failures = {"left": 2}

    def flaky_append(data, *args, **kwargs):
        if failures["left"] > 0:
            failures["left"] -= 1
            raise CommitFailedException("someone else committed first")
        return real_append(data, *args, **kwargs)

    monkeypatch.setattr(table, "append", flaky_append)
    tables.append_blocks([("user", "u1", "views", T0, M5, b"x")], written_ms=1)
    assert tables.count_rows("blocks") == 1

    failures["left"] = 100
    with pytest.raises(OfflineTableError, match="lost 6 commit races"):
        tables.append_blocks([("user", "u2", "views", T0, M5, b"x")], written_ms=1)


def test_replace_blocks_swaps_one_feature_range_in_one_commit(tables: OfflineTables) -> None:
    tables.append_blocks(_blocks(), written_ms=100)
    n = tables.replace_blocks("views", T0, T0 + H1, [("user", "u1", "views", T0, M5, b"new")],
                              written_ms=200, sizes=(M5, H1))
    assert n == 1
    got = tables.scan_blocks()
    by_key = dict(zip(_keys(got), got.column("rep").to_pylist(), strict=True))
    # every 'views' block starting in the hour is gone but the new one; 'clicks' and the
    # next day's block are untouched
    assert [k for k in by_key if k[2] == "views"] == [
        ("item", "i1", "views", T0 + DAY, M5), ("user", "u1", "views", T0, M5)]
    assert by_key[("user", "u1", "views", T0, M5)] == b"new"
    assert sum(1 for k in by_key if k[2] == "clicks") == 6
    assert tables.replace_blocks("views", T0, T0 + H1, [], sizes=(M5, H1)) == 0
    assert [k for k in _keys(tables.scan_blocks()) if k[2] == "views"] == [
        ("item", "i1", "views", T0 + DAY, M5)]


def test_replace_blocks_keeps_roll_ups_the_range_cuts(tables: OfflineTables) -> None:
    """A range ending inside an hour cannot recompute that hour's block, so it keeps it: a
    live flow that sealed it before the batch ran must not lose it to the replacement."""
    tables.append_blocks(_blocks(), written_ms=100)
    cut = T0 + H1 - M5  # ends inside the 1h block [T0, T0 + H1)
    tables.replace_blocks("views", T0, cut, [("user", "u1", "views", T0, M5, b"new")],
                          written_ms=200, sizes=(M5, H1))
    views = {k for k in _keys(tables.scan_blocks()) if k[2] == "views"}
    assert views == {("user", "u1", "views", T0, M5), ("user", "u1", "views", T0, H1),
                     ("item", "i1", "views", T0 + DAY, M5)}
    with pytest.raises(OfflineTableError, match="not a block of sizes"):
        tables.replace_blocks("views", T0, cut, [("user", "u1", "views", T0, H1, b"x")],
                              sizes=(M5, H1))


def test_replace_blocks_retries_when_a_live_writer_adds_to_the_range(
        tmp_path: Path) -> None:
    """A blocks flow appending sealed blocks of the range while the replacement commits:
    the replacement is redone on the new snapshot, so the range holds exactly its rows."""
    batch = OfflineTables.open(tmp_path / "wh", catalog_key="batch")
    live = OfflineTables.open(tmp_path / "wh", catalog_key="live")
    batch._backoff_s = 0.0
    batch.append_blocks(_blocks(), written_ms=100)
    from pyiceberg.table import Transaction

    real_commit = Transaction.commit_transaction
    raced = {"n": 0}

    def racing_commit(self):
        if raced["n"] == 0:
            raced["n"] += 1
            live.append_blocks([("user", "u9", "views", T0 + M5, M5, b"live")], written_ms=150)
        return real_commit(self)

    Transaction.commit_transaction = racing_commit
    try:
        batch.replace_blocks("views", T0, T0 + H1, [("user", "u1", "views", T0, M5, b"b")],
                             written_ms=200, sizes=(M5, H1))
    finally:
        Transaction.commit_transaction = real_commit
    assert raced["n"] == 1
    views = [k for k in _keys(batch.scan_blocks()) if k[2] == "views" and k[3] < T0 + H1]
    assert views == [("user", "u1", "views", T0, M5)]


def test_bad_rows_name_the_problem(tables: OfflineTables) -> None:
    with pytest.raises(OfflineTableError, match="block rows must have 6 fields"):
        tables.append_blocks([("user", "u1", "views", T0, M5)], written_ms=1)  # type: ignore[list-item]
    with pytest.raises(OfflineTableError, match="bad block rows"):
        tables.append_blocks([("user", "u1", "views", "soon", M5, b"x")], written_ms=1)  # type: ignore[list-item]
    with pytest.raises(OfflineTableError, match=r"column\(s\) \['entity_id'\] contain None"):
        tables.append_blocks([("user", None, "views", T0, M5, b"x")], written_ms=1)  # type: ignore[list-item]
    with pytest.raises(OfflineTableError, match="unknown table 'nope'"):
        tables.count_rows("nope")  # type: ignore[arg-type]
    assert tables.count_rows("blocks") == 0


def test_remote_warehouse_needs_a_catalog() -> None:
    with pytest.raises(OfflineTableError, match="pass catalog_uri= or catalog_properties="):
        OfflineTables.open("s3://bucket/tessera")


def test_catalog_properties(tmp_path: Path) -> None:
    wh = tmp_path / "wh"
    wh.mkdir()
    tables = OfflineTables.open(
        wh,
        catalog_properties={"type": "sql", "uri": f"sqlite:///{tmp_path / 'other.db'}"},
        namespace="prod",
    )
    tables.append_blocks([("user", "u1", "views", T0, M5, b"x")], written_ms=1)
    assert tables.scan_blocks().num_rows == 1
    assert not (wh / "catalog.db").exists()


def test_a_writer_s_late_events_replayed_after_a_crash_are_written_once(
        tables: OfflineTables) -> None:
    """A late-events writer records its highest committed offset per partition in each
    commit; a replay skips what is at or below it. Marks survive other writers' commits and
    commits without marks (compaction); a partition whose log was reset starts over."""
    def late(p: int, off: int) -> LateEventRow:
        return LateEventRow("views", p, off, T0 + off, f"e{p}-{off}", b"\x00", T0)

    assert tables.append_late_events([late(0, k) for k in range(1, 6)], writer="blocks") == 5
    assert tables.append_late_events([late(1, 4)], writer="labels") == 1
    tables.append_late_events([late(9, 1)])  # no writer: no marks in this commit
    assert tables.late_marks("blocks") == {"views:0": 5}
    assert tables.late_marks() == {"blocks.views:0": 5, "labels.views:1": 4}
    # the replay after a crash: 3..5 again, then 6..8
    assert tables.append_late_events([late(0, k) for k in range(3, 9)], writer="blocks") == 3
    assert tables.append_late_events([late(0, 2)], writer="blocks") == 0
    # another writer reads the same partition on its own marks
    assert tables.append_late_events([late(0, 3)], writer="labels") == 1
    assert tables.count_rows("late_events") == 5 + 1 + 1 + 3 + 1
    # the broker restarted empty: offsets of views:0 start again at 0
    assert tables.append_late_events([late(0, 0), late(0, 1)], writer="blocks",
                                     reset=["views:0"]) == 2
    assert tables.late_marks("blocks") == {"views:0": 1}


def test_sealed_block_marks_are_raised_per_writer_and_shard_and_carried_forward(tmp_path):
    """A marked commit keeps every writer's marks (its own raised, never lowered); an
    unmarked commit (a batch replacement) does not hide them."""
    tables = OfflineTables.open(tmp_path / "wh")
    row = ("item", "i1", "f@1", 0, 300_000, b"\x01")
    tables.append_blocks([row], writer="blocks", sealed_through={"views/item_id/0": 600_000})
    tables.append_blocks([row[:3] + (300_000,) + row[4:]], writer="replay-x",
                         sealed_through={"views/item_id/0": 300_000})
    tables.append_blocks([row[:3] + (600_000,) + row[4:]], writer="blocks",
                         sealed_through={"views/item_id/0": 300_000, "views/item_id/1": 900_000})
    tables.append_blocks([row[:3] + (900_000,) + row[4:]])  # no writer: no marks
    assert tables.sealed_marks("blocks") == {"views/item_id/0": 600_000,
                                             "views/item_id/1": 900_000}
    assert tables.sealed_marks("replay-x") == {"views/item_id/0": 300_000}
    assert tables.sealed_marks("other") == {}
