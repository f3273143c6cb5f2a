"""``tessera import events``: files with a column mapping in, exact events out of Kafka."""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from schemas.columnar import columns_to_records, decode_message
from tessera.cli import cli
from tessera.importer import EventImportError, ImportConfig, import_events
from tessera.topics import read_to_end

T0_S = 1_790_000_000  # epoch seconds of the first row


def _read_back(bootstrap: str, topic: str) -> list[tuple[int, dict[str, Any]]]:
    """Return ``(partition, record)`` of every event on ``topic``, in offset order."""
    out = []
    for msg in read_to_end(bootstrap, topic):
        for rec in columns_to_records(decode_message(msg.value(), topic)):
            out.append((msg.partition(), rec))
    return out


def _views_csv(path: Path) -> Path:
    # row 2: ts not a number; row 3: uid empty; row 4: dwell not an integer.
    path.write_text(
        "uid,item,author,cat,ts,dwell\n"
        f"u1,i1,a1,news,{T0_S},100\n"
        f"u2,i2,a2,sport,{T0_S + 10},\n"
        "u3,i3,a3,news,yesterday,5\n"
        f",i4,a4,news,{T0_S + 20},5\n"
        f"u5,i5,a5,news,{T0_S + 30},lots\n"
        f"u6,i6,a6,news,{T0_S + 40}.5,7\n"
    )
    return path


VIEW_MAP = {"user_id": "uid", "item_id": "item", "author_id": "author", "topic": "cat"}


def test_csv_import_maps_coerces_and_rejects_rows(fresh_broker: str, tmp_path: Path) -> None:
    config = ImportConfig(
        path=_views_csv(tmp_path / "views.csv"),
        topic="views",
        mapping={**VIEW_MAP, "dwell_ms": "dwell"},
        time_column="ts",
        time_unit="s",
        defaults={"surface": "home"},
        batch_events=2,
    )
    seen = []
    report = import_events(config, fresh_broker, progress=lambda r: seen.append(r.rows))

    assert (report.rows, report.produced, report.rejected) == (6, 3, 3)
    assert dict(report.rejected_reasons) == {
        "event_ts: not a time in s (column 'ts')": 1,
        "user_id: missing (column 'uid')": 1,
        "dwell_ms: not an integer (column 'dwell')": 1,
    }
    assert report.samples[0] == "row 2: event_ts: not a time in s (column 'ts'): 'yesterday'"
    assert (report.min_ts, report.max_ts) == (T0_S * 1000, (T0_S + 40) * 1000 + 500)
    assert seen == [6]

    got = sorted(_read_back(fresh_broker, "views"), key=lambda pr: pr[1]["event_id"])
    assert [rec for _, rec in got] == [
        {"event_id": "import-views-0", "event_ts": T0_S * 1000, "user_id": "u1",
         "item_id": "i1", "author_id": "a1", "topic": "news", "surface": "home",
         "dwell_ms": 100, "position": 0, "request_id": None},
        {"event_id": "import-views-1", "event_ts": (T0_S + 10) * 1000, "user_id": "u2",
         "item_id": "i2", "author_id": "a2", "topic": "sport", "surface": "home",
         "dwell_ms": 0, "position": 0, "request_id": None},
        {"event_id": "import-views-5", "event_ts": (T0_S + 40) * 1000 + 500, "user_id": "u6",
         "item_id": "i6", "author_id": "a6", "topic": "news", "surface": "home",
         "dwell_ms": 7, "position": 0, "request_id": None},
    ]  # fmt: skip
    for partition, rec in got:
        assert partition == zlib.crc32(rec["user_id"].encode()) % 3


def test_parquet_import_compresses_and_shifts_time(fresh_broker: str, tmp_path: Path) -> None:
    # Engagements over 100 s, ms timestamps; one unknown action and one null user.
    n = 11
    ts = [T0_S * 1000 + 10_000 * i for i in range(n)]
    actions = ["click", "like", "poke", "share", "save", "hide"] + ["click", "like", "save"] * 2
    users = [f"u{i % 4}" for i in range(n)]
    users[7] = None
    table = pa.table(
        {
            "id": [f"e{i}" for i in range(n)],
            "when": pa.array(ts, pa.int64()),
            "imp": [f"imp{i}" for i in range(n)],
            "user_id": users,
            "item_id": pa.array([f"i{i % 3}" for i in range(n)]).dictionary_encode(),
            "action": actions[:n],
            "dwell_ms": pa.array(range(n), pa.int32()),
        }
    )
    path = tmp_path / "eng.parquet"
    pq.write_table(table, path, row_group_size=4)
    end = 1_800_000_000_000
    config = ImportConfig(
        path=path,
        topic="engagements",
        mapping={"event_id": "id", "event_ts": "when", "impression_id": "imp"},
        compress=10,
        shift_to=end,
        read_rows=3,
    )
    report = import_events(config, fresh_broker)

    assert (report.rows, report.produced, report.rejected) == (11, 9, 2)
    assert dict(report.rejected_reasons) == {
        "action: not one of click, like, share, save, hide": 1,
        "user_id: missing (column 'user_id')": 1,
    }
    # 10 s apart becomes 1 s apart; the last row (kept) ends exactly at `end`.
    expected_ts = {f"e{i}": end - 1000 * (n - 1 - i) for i in range(n)}
    assert report.max_ts == end and report.min_ts == end - 10_000
    got = _read_back(fresh_broker, "engagements")
    by_id = {rec["event_id"]: rec for _, rec in got}
    assert sorted(by_id) == sorted(f"e{i}" for i in range(n) if i not in (2, 7))
    for i in (0, 1, 3, 10):
        assert by_id[f"e{i}"] == {
            "event_id": f"e{i}", "event_ts": expected_ts[f"e{i}"], "impression_id": f"imp{i}",
            "user_id": f"u{i % 4}", "item_id": f"i{i % 3}", "author_id": "", "topic": "",
            "action": actions[i], "dwell_ms": i,
        }  # fmt: skip
    for partition, rec in got:
        assert partition == zlib.crc32(rec["user_id"].encode()) % 3
    # Within a partition, file order (and so time order) is kept.
    for p in range(3):
        times = [rec["event_ts"] for q, rec in got if q == p]
        assert times == sorted(times)


def test_iso_times_and_shift_without_compression(fresh_broker: str, tmp_path: Path) -> None:
    path = tmp_path / "iso.csv"
    path.write_text(
        "user_id,item_id,author_id,topic,at\n"
        "u1,i1,a1,t,2026-01-01T00:00:00Z\n"
        "u1,i2,a1,t,2026-01-01 00:01:00.250\n"
        "u1,i3,a1,t,2026-01-01T02:02:00+02:00\n"
    )
    config = ImportConfig(
        path=path, topic="views", time_column="at", time_unit="iso", shift_to=10_000_000
    )
    report = import_events(config, fresh_broker)
    assert report.produced == 3
    got = [rec["event_ts"] for _, rec in _read_back(fresh_broker, "views")]
    assert got == [10_000_000 - 120_000, 10_000_000 - 59_750, 10_000_000]


# ---------------------------------------------------------------- errors (no broker needed)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"mapping": {"uid": "user"}},
            "cannot map column 'user' to field 'uid': topic 'views' has no such field; its "
            "fields are event_id, event_ts, user_id, item_id, author_id, topic, surface, "
            "dwell_ms, position, request_id",
        ),
        (
            {"defaults": {"colour": "red"}},
            "cannot set a default for field 'colour': topic 'views' has no such field; its "
            "fields are event_id, event_ts, user_id, item_id, author_id, topic, surface, "
            "dwell_ms, position, request_id",
        ),
        (
            {"topic": "clicks"},
            "unknown topic 'clicks': events can be imported into views, engagements, "
            "impressions, items; declare a source for other events in the features file "
            "(sources:) and pass it with --features",
        ),
        (
            {"path": "views.json"},
            "unsupported file type 'views.json': expected one of .csv, .csv.gz, .csv.bz2, "
            ".tsv, .tsv.gz, .tab, .parquet, .pq; name the format with --format csv|tsv|parquet",
        ),
        (
            {"defaults": {"dwell_ms": "long"}},
            "default for field 'dwell_ms' of topic 'views': expected an integer, got 'long'",
        ),
        (
            {"mapping": {"user_id": "uid"}, "defaults": {"user_id": "u"}},
            "field 'user_id' is both mapped to column 'uid' and given a default; drop one of them",
        ),
        ({"compress": 0}, "compress must be a finite number > 0 (10 = ten times faster), got 0"),
        ({"time_unit": "h"}, "time_unit must be one of ms, s, us, iso, got 'h'"),
    ],
)
def test_config_errors(kwargs: dict[str, Any], message: str) -> None:
    args = {"path": "views.csv", "topic": "views", **kwargs}
    with pytest.raises(EventImportError) as info:
        ImportConfig(**args)
    # sources other tests declared in this process are importable too, and listed
    from schemas.registry import TOPICS, event_topics

    got = str(info.value)
    for declared in set(event_topics()) - set(TOPICS):
        got = got.replace(f", {declared}", "")
    assert got == message


def test_mapping_to_a_missing_column_or_missing_required_field(tmp_path: Path) -> None:
    path = _views_csv(tmp_path / "views.csv")
    columns = "uid, item, author, cat, ts, dwell"
    bad = ImportConfig(path=path, topic="views", mapping={**VIEW_MAP, "event_ts": "time"})
    with pytest.raises(EventImportError) as info:
        import_events(bad, "127.0.0.1:1")
    assert str(info.value) == (
        f"field 'event_ts' is mapped to column 'time', but views.csv has no such column; "
        f"its columns are {columns}"
    )
    short = ImportConfig(path=path, topic="views", mapping={"user_id": "uid"})
    with pytest.raises(EventImportError) as info:
        import_events(short, "127.0.0.1:1")
    assert str(info.value) == (
        "field 'event_ts' of topic 'views' is required, but views.csv has no column "
        "'event_ts'; map one with --map event_ts=COLUMN (mapping={'event_ts': COLUMN}) or "
        f"give --default event_ts=VALUE; its columns are {columns}"
    )


def test_missing_file(tmp_path: Path) -> None:
    config = ImportConfig(path=tmp_path / "nope.parquet", topic="views")
    with pytest.raises(EventImportError, match=r"^file '.*nope\.parquet' does not exist$"):
        import_events(config, "127.0.0.1:1")


# ---------------------------------------------------------------- command line


def test_cli_imports_and_prints_a_summary(fresh_broker: str, tmp_path: Path) -> None:
    path = _views_csv(tmp_path / "views.csv")
    args = ["import", "events", str(path), "--topic", "views", "--bootstrap", fresh_broker]
    for field, column in VIEW_MAP.items():
        args += ["--map", f"{field}={column}"]
    args += ["--time-column", "ts", "--time-unit", "s", "--map", "dwell_ms=dwell"]
    args += ["--compress", "10", "--default", "position=3", "--batch-events", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "rows      6" in result.output
    assert "produced  3 events in 3 messages" in result.output
    assert "rejected  3" in result.output
    assert "1  user_id: missing (column 'uid')" in result.output
    assert "time span 2026-09-21T14:13:20Z .. 2026-09-21T14:13:24.050000Z (4.05 s)" in (
        result.output
    )
    recs = [rec for _, rec in _read_back(fresh_broker, "views")]
    assert sorted(r["position"] for r in recs) == [3, 3, 3]

    bad = CliRunner().invoke(cli, [*args[:5], "--map", "nope=uid", "--bootstrap", fresh_broker])
    assert bad.exit_code == 1
    assert "cannot map column 'uid' to field 'nope'" in bad.output


@pytest.mark.parametrize("sort_rows", [10_000, 70])
def test_shuffled_file_is_produced_in_time_order(fresh_broker: str, tmp_path: Path,
                                                 sort_rows: int) -> None:
    """In memory and in spilled time buckets alike: every partition's events come out in
    event-time order, ids still name each row of the file, nothing lost."""
    import numpy as np

    rng = np.random.default_rng(4)
    ts = T0_S + rng.permutation(500)
    rows = [f"u{k % 7},i{k},a1,news,{t},5\n" for k, t in enumerate(ts.tolist())]
    path = tmp_path / "views.csv"
    path.write_text("uid,item,author,cat,ts,dwell_ms\n" + "".join(rows))
    config = ImportConfig(path=path, topic="views", mapping=VIEW_MAP, time_column="ts",
                          time_unit="s", defaults={"surface": "home"}, batch_events=50,
                          read_rows=64, sort_rows=sort_rows)
    report = import_events(config, fresh_broker)
    assert (report.rows, report.produced, report.rejected) == (500, 500, 0)
    assert report.out_of_order > 200
    assert report.buckets == (1 if sort_rows >= 500 else -(-500 // sort_rows))
    got = _read_back(fresh_broker, "views")
    assert len(got) == 500
    by_part: dict[int, list[int]] = {}
    for partition, rec in got:
        by_part.setdefault(partition, []).append(rec["event_ts"])
        k = int(rec["event_id"].rsplit("-", 1)[1])
        assert rec["event_ts"] == int(ts[k]) * 1000 and rec["item_id"] == f"i{k}"
    for times in by_part.values():
        assert times == sorted(times)
