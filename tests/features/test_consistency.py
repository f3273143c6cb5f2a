"""Online/offline consistency: logged values against the offline recomputation, in memory.

The case (one impression hour, 1h windows, watermark 2 minutes behind the impression):

    window of every row   [11:05, 12:05)  (end = align_down(event_ts - 2m, 5m))
    on-time views         i0..i5 inside the window; ghost has none
    late views            i4 @ 11:50  (inside the window  -> online missed it)
                          i1 @ 12:30  (after the window   -> harmless)
    offline blocks        every view (batch correction put the late ones in)
    online blocks         on-time views only

    rows  entity  logged                               expected cause
    12    i0..i3  online values (float32)              match
     3    i4      online values (without the late one) late_data
     1    i5      no-data values (read had no block)   missing_blocks
     1    ghost   item_views_1h = 4, no block offline  missing_blocks (views, score)
     1    i0      item_views_1h one too many            other (views, score)
"""

from __future__ import annotations

import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from features.backfill import backfill_columns
from features.batch import compute_blocks
from features.consistency import (
    CAUSES,
    ConsistencyError,
    consistency_report,
    logged_features,
    values_match,
)
from features.consistency_plot import PlotDependencyError, plot_consistency
from features.spec import DerivedFeatureSpec, FeatureSet, FeatureSpec
from features.timeutil import DAY, HOUR, MINUTE
from schemas.codec import encode
from schemas.columnar import records_to_columns

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
IMP = T0 + 12 * HOUR + 7 * MINUTE

VIEWS = FeatureSpec(name="item_views", source="views", entity="item_id", aggregation="count",
                    windows=(HOUR,))
DWELL = FeatureSpec(name="item_dwell_mean", source="views", entity="item_id", aggregation="mean",
                    value="dwell_ms", filter="dwell_ms > 0", windows=(HOUR,), default=-1.0)
SCORE = DerivedFeatureSpec(name="item_score_1h", entity_type="item",
                           expression="item_views_1h * 2 + 1", inputs=("item_views_1h",))
FS = FeatureSet(features=(VIEWS, DWELL), derived=(SCORE,))
NAMES = ["item_views_1h", "item_dwell_mean_1h", "item_score_1h"]


def _view(i: int, item: str, ts: int, dwell: int) -> dict:
    return {"event_id": f"v{i}", "event_ts": ts, "user_id": f"u{i % 3}", "item_id": item,
            "author_id": "a0", "topic": "t0", "dwell_ms": dwell}


def _on_time_views() -> list[dict]:
    counts = {"i0": 3, "i1": 2, "i2": 4, "i3": 1, "i4": 2, "i5": 2}
    out = []
    for item, n in counts.items():
        for k in range(n):
            ts = T0 + 11 * HOUR + 10 * MINUTE + k * 11 * MINUTE + 7_000
            dwell = 0 if (item, k) == ("i2", 3) else 1000 + 37 * k + 13 * len(out)
            out.append(_view(len(out), item, ts, dwell))
    return out


LATE = [_view(100, "i4", T0 + 11 * HOUR + 50 * MINUTE, 777),
        _view(101, "i1", T0 + 12 * HOUR + 30 * MINUTE, 5000)]


def _blocks(views: list[dict]) -> pa.Table:
    cols = records_to_columns("views", views)
    ids, keys, starts, sizes, reps = [], [], [], [], []
    for spec in FS.features:
        res = compute_blocks(spec, cols, T0, T0 + DAY)
        for size in res.by_size:
            ents, st, rp = res.rows(size)
            ids += ents
            keys += [spec.key] * len(ents)
            starts += st
            sizes += [size] * len(ents)
            reps += rp
    n = len(ids)
    return pa.table({"entity_type": ["item"] * n, "entity_id": ids, "feature_key": keys,
                     "start_ms": pa.array(starts, pa.int64()),
                     "size_ms": pa.array(sizes, pa.int64()), "rep": pa.array(reps, pa.binary()),
                     "written_ms": pa.array([0] * n, pa.int64())})


def _scanner(blocks: pa.Table):
    def scan_blocks(*, feature_keys=None, start_from=None, start_to=None, **_):
        mask = pc.is_in(blocks.column("feature_key"), pa.array(list(feature_keys)))
        if start_from is not None:
            mask = pc.and_(mask, pc.greater_equal(blocks.column("start_ms"), start_from))
        if start_to is not None:
            mask = pc.and_(mask, pc.less(blocks.column("start_ms"), start_to))
        return blocks.filter(mask)
    return scan_blocks


OFFLINE = _scanner(_blocks(_on_time_views() + LATE))
ONLINE = _scanner(_blocks(_on_time_views()))


def _late_table(late: list[dict] = LATE) -> pa.Table:
    return pa.table({
        "topic": ["views"] * len(late), "partition": pa.array([0] * len(late), pa.int32()),
        "offset": pa.array(range(len(late)), pa.int64()),
        "event_ts": pa.array([e["event_ts"] for e in late], pa.int64()),
        "event_id": [e["event_id"] for e in late],
        "payload": pa.array([encode("views", e) for e in late], pa.binary()),
        "detected_ms": pa.array([IMP] * len(late), pa.int64()),
    })


def _keys(rows: list[tuple[str, str, int]]) -> pa.Table:
    return pa.table({"impression_id": [r[0] for r in rows], "item_id": [r[1] for r in rows],
                     "event_ts": pa.array([r[2] for r in rows], pa.int64()),
                     "feature_watermark": pa.array([r[2] - 2 * MINUTE for r in rows], pa.int64())})


def _f32(x: float) -> float:
    return float(np.float32(x))


def _impressions(as_json: bool = True) -> pa.Table:
    rows = [(f"imp-{item}-{k}", item, IMP + k * MINUTE)
            for item in ("i0", "i1", "i2", "i3", "i4") for k in range(3)]
    rows += [("imp-i5", "i5", IMP), ("imp-ghost", "ghost", IMP), ("imp-other", "i0", IMP)]
    keys = _keys(rows)
    online = backfill_columns(keys, FS, NAMES, ONLINE)
    logged = []
    for i, (imp, _, _) in enumerate(rows):
        vals = {n: _f32(online[n][i]) for n in NAMES}
        vals["position_bias"] = 0.25  # logged, but not a feature of the definitions: ignored
        if imp == "imp-i5":
            vals.update(item_views_1h=0.0, item_dwell_mean_1h=-1.0, item_score_1h=1.0)
        elif imp == "imp-ghost":
            del vals["item_dwell_mean_1h"]
            vals.update(item_views_1h=4.0, item_score_1h=9.0)
        elif imp == "imp-other":
            vals["item_views_1h"] += 1
            vals["item_score_1h"] += 2
        logged.append(vals)
    col = pa.array([json.dumps(v) for v in logged]) if as_json else pa.array(logged)
    return keys.append_column("features", col)


def test_online_blocks_really_differ_for_the_late_entity_only():
    keys = _keys([("a", "i4", IMP), ("b", "i1", IMP), ("c", "i2", IMP)])
    on, off = backfill_columns(keys, FS, NAMES, ONLINE), backfill_columns(keys, FS, NAMES, OFFLINE)
    assert on["item_views_1h"].tolist() == [2, 2, 4]
    assert off["item_views_1h"].tolist() == [3, 2, 4]  # i1's late view is after the window
    assert off["item_dwell_mean_1h"][0] != on["item_dwell_mean_1h"][0]


@pytest.mark.parametrize("as_json", [True, False], ids=["json-column", "dict-column"])
def test_matched_shares_and_causes_are_exact(as_json):
    rep = consistency_report(_impressions(as_json), FS, OFFLINE, _late_table(), from_ts=T0,
                             to_ts=T0 + DAY)
    assert rep.impressions == rep.sampled == 18
    assert rep.late_events == 2
    assert [f.name for f in rep.features] == sorted(NAMES)  # position_bias ignored
    got = {f.name: (f.rows, f.matched, dict(f.causes)) for f in rep.features}
    assert got == {
        "item_views_1h": (18, 12, {"late_data": 3, "missing_blocks": 2, "other": 1}),
        "item_score_1h": (18, 12, {"late_data": 3, "missing_blocks": 2, "other": 1}),
        "item_dwell_mean_1h": (17, 13, {"late_data": 3, "missing_blocks": 1, "other": 0}),
    }
    views = rep.feature("item_views_1h")
    assert views.matched_share == pytest.approx(12 / 18)
    assert views.share("late_data") == pytest.approx(3 / 18)
    by_cause = {c: [m.impression_id for m in views.examples if m.cause == c] for c in CAUSES}
    assert by_cause == {"late_data": ["imp-i4-0", "imp-i4-1", "imp-i4-2"],
                        "missing_blocks": ["imp-i5", "imp-ghost"], "other": ["imp-other"]}
    ghost = next(m for m in views.examples if m.impression_id == "imp-ghost")
    assert (ghost.logged, ghost.offline) == (4.0, 0.0)
    assert rep.matched_share == pytest.approx((12 + 12 + 13) / (18 + 18 + 17))


def test_unexplained_counts_every_mismatch_late_data_does_not_account_for():
    rep = consistency_report(_impressions(), FS, OFFLINE, _late_table(), from_ts=T0,
                             to_ts=T0 + DAY)
    assert {f.name: f.unexplained for f in rep.features} == {
        "item_views_1h": 3, "item_score_1h": 3, "item_dwell_mean_1h": 1}
    assert rep.unexplained == 7
    data = json.loads(rep.to_json())
    assert data["unexplained"] == 7 and data["features"][2]["unexplained"] == 3
    assert "7 unexplained" in rep.to_table()


def test_a_late_event_excuses_a_count_only_by_exactly_its_part():
    """i4's window holds one late view: a logged count two below the offline one (a window
    end read too early, say) is not late data, where one below is."""
    table = _impressions()
    rows = table.to_pylist()
    for r in rows:
        if r["impression_id"] == "imp-i4-0":
            vals = json.loads(r["features"])
            vals["item_views_1h"] -= 1
            r["features"] = json.dumps(vals)
    rep = consistency_report(pa.Table.from_pylist(rows, schema=table.schema), FS, OFFLINE,
                             _late_table(), from_ts=T0, to_ts=T0 + DAY)
    assert dict(rep.feature("item_views_1h").causes) == {
        "late_data": 2, "missing_blocks": 2, "other": 2}
    other = [m.impression_id for m in rep.feature("item_views_1h").examples
             if m.cause == "other"]
    assert "imp-i4-0" in other


def test_late_events_a_batch_already_corrected_online_still_count_as_late_data():
    """i4's window holds two late views; a batch run before the request may have put none,
    one or both into the online blocks: logged counts of offline - 2, - 1 and - 0 are late
    data or a match, one above the offline count is not."""
    extra = _view(102, "i4", T0 + 11 * HOUR + 55 * MINUTE, 900)
    offline = _scanner(_blocks(_on_time_views() + LATE + [extra]))
    keys = _keys([(f"imp-{k}", "i4", IMP) for k in range(4)])
    online = backfill_columns(keys, FS, ["item_views_1h"], ONLINE)["item_views_1h"]
    logged = [{"item_views_1h": float(online[k] + k)} for k in range(4)]
    table = keys.append_column("features", pa.array([json.dumps(v) for v in logged]))
    rep = consistency_report(table, FS, offline, _late_table([*LATE, extra]))
    views = rep.feature("item_views_1h")
    assert (views.rows, views.matched, dict(views.causes)) == (
        4, 1, {"late_data": 2, "missing_blocks": 0, "other": 1})
    assert [m.impression_id for m in views.examples if m.cause == "other"] == ["imp-3"]


def test_without_late_events_table_late_rows_are_other():
    rep = consistency_report(_impressions(), FS, OFFLINE, None)
    assert dict(rep.feature("item_views_1h").causes) == {
        "late_data": 0, "missing_blocks": 2, "other": 4}


def test_float32_logging_is_tolerated_but_real_differences_are_not():
    a = np.array([1234.567891, 0.1, 0.0, np.nan, 5.0, 1e9])
    b = np.array([_f32(1234.567891), _f32(0.1), 0.0, np.nan, 5.00001, 1e9 + 1000])
    assert values_match(a, b).tolist() == [True, True, True, True, False, True]
    assert not values_match(np.array([1e9]), np.array([1e9 + 1001]))[0]


def test_sample_is_seeded_and_bounded():
    imps = _impressions()
    one = consistency_report(imps, FS, OFFLINE, _late_table(), sample=7, seed=3)
    two = consistency_report(imps, FS, OFFLINE, _late_table(), sample=7, seed=3)
    assert one.sampled == 7 and one.impressions == 18
    assert one.feature("item_views_1h").rows == 7
    assert one.to_dict() == two.to_dict()


def test_table_and_json_outputs():
    rep = consistency_report(_impressions(), FS, OFFLINE, _late_table(), from_ts=T0,
                             to_ts=T0 + DAY)
    text = rep.to_table()
    assert "online/offline consistency 2026-01-01T00:00:00Z .. 2026-01-02T00:00:00Z" in text
    assert "18 of 18 impressions sampled (seed 0), 2 late events" in text
    line = next(ln for ln in text.splitlines() if ln.startswith("item_views_1h "))
    assert line.split() == ["item_views_1h", "18", "66.7%", "3", "2", "1"]
    assert re.search(r"item_views_1h +missing_blocks +imp-ghost +logged 4  offline 0", text)
    data = json.loads(rep.to_json())
    assert data["features"][2]["name"] == "item_views_1h"
    assert data["features"][2]["causes"] == {"late_data": 3, "missing_blocks": 2, "other": 1}
    assert data["sampled"] == 18 and data["from_ts"] == T0


def test_png_is_written(tmp_path):
    rep = consistency_report(_impressions(), FS, OFFLINE, _late_table(), from_ts=T0,
                             to_ts=T0 + DAY)
    path = plot_consistency(rep, tmp_path / "out" / "consistency.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 5_000


def test_missing_matplotlib_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    rep = consistency_report(_impressions(), FS, OFFLINE, None)
    with pytest.raises(PlotDependencyError) as err:
        plot_consistency(rep, tmp_path / "c.png")
    assert str(err.value) == ("writing the consistency plot needs matplotlib, which is not "
                              "installed; install it with: pip install 'tessera[plots]'")
    assert not (tmp_path / "c.png").exists()


def test_logged_features_accepts_json_maps_and_dicts():
    assert logged_features(pa.array(['{"a": 1}', None])) == [{"a": 1.0}, {}]
    maps = pa.array([[("a", 2.0)]], pa.map_(pa.string(), pa.float64()))
    assert logged_features(maps) == [{"a": 2.0}]
    assert logged_features([{"a": 3, "b": None}]) == [{"a": 3.0}]
    with pytest.raises(ConsistencyError, match="row 0 are not a JSON object"):
        logged_features(pa.array(["{nope"]))


def test_missing_columns_are_named():
    imps = _impressions().drop_columns(["item_id"])
    with pytest.raises(ConsistencyError, match=r"miss the entity key column\(s\) \['item_id'\]"):
        consistency_report(imps, FS, OFFLINE, None)
    with pytest.raises(ConsistencyError, match="sample must be >= 1, got 0"):
        consistency_report(_impressions(), FS, OFFLINE, None, sample=0)


DEFINITIONS = """
features:
  - name: item_views
    source: views
    entity: item_id
    aggregation: count
    windows: [1h]
  - name: item_dwell_mean
    source: views
    entity: item_id
    aggregation: mean
    value: dwell_ms
    filter: "dwell_ms > 0"
    windows: [1h]
    default: -1
derived:
  - name: item_score_1h
    entity: item
    expression: "item_views_1h * 2 + 1"
"""


def test_cli_reads_the_warehouse_prints_the_table_and_writes_the_png(tmp_path):
    """The command end to end on a real (local Iceberg) warehouse."""
    from click.testing import CliRunner

    from features.offline.training import TrainingTables
    from features.spec_loader import load_features
    from tessera.commands.consistency import consistency

    defs = tmp_path / "features.yaml"
    defs.write_text(DEFINITIONS)
    assert {f.key for f in load_features(defs).features} == {f.key for f in FS.features}
    training = TrainingTables.open(tmp_path / "wh")
    blocks = _blocks(_on_time_views() + LATE)
    training.offline.append_blocks(list(zip(*(blocks.column(c).to_pylist() for c in (
        "entity_type", "entity_id", "feature_key", "start_ms", "size_ms", "rep")))))
    late = _late_table()
    training.offline.append_late_events(list(zip(*(late.column(c).to_pylist() for c in (
        "topic", "partition", "offset", "event_ts", "event_id", "payload", "detected_ms")))))
    imps = _impressions().to_pylist()
    training.append_rows([{**r, "request_id": "r", "user_id": "u", "author_id": "a0",
                           "topic": "t0", "position": 0, "feed_type": "EXPLORE", "source": "s",
                           "model_versions": {}, "scores": {},
                           **{f"label_{a}": 0 for a in ("click", "like", "share", "save", "hide")},
                           "label_window_ms": HOUR, "matured_at": r["event_ts"] + HOUR}
                          for r in imps])
    png = tmp_path / "plot.png"
    res = CliRunner().invoke(consistency, [
        "--from", "2026-01-01T00:00:00Z", "--to", "2026-01-02T00:00:00Z", "--warehouse",
        str(tmp_path / "wh"), "--definitions", str(defs), "--png", str(png)])
    assert res.exit_code == 0, res.output
    line = next(ln for ln in res.output.splitlines() if ln.startswith("item_views_1h "))
    assert line.split() == ["item_views_1h", "18", "66.7%", "3", "2", "1"]
    assert "impressions from the training table (v1)" in res.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    res = CliRunner().invoke(consistency, [
        "--from", "2026-01-01T00:00:00Z", "--to", "2026-01-02T00:00:00Z", "--warehouse",
        str(tmp_path / "wh"), "--definitions", str(defs), "--png", str(png), "--json",
        "--sample", "5"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output[:res.output.rindex("}") + 1])
    assert data["sampled"] == 5 and data["impressions"] == 18

    out = tmp_path / "dash" / "consistency.json"
    res = CliRunner().invoke(consistency, [
        "--from", "2026-01-01T00:00:00Z", "--to", "2026-01-02T00:00:00Z", "--warehouse",
        str(tmp_path / "wh"), "--definitions", str(defs), "--png", str(png), "--output", str(out)])
    assert res.exit_code == 0, res.output
    saved = json.loads(out.read_text())
    assert saved["rows"] == 18 + 18 + 17 and saved["unexplained"] == 7


def test_empty_range_says_so():
    rep = consistency_report(_impressions().slice(0, 0), FS, OFFLINE, None, from_ts=T0,
                             to_ts=T0 + DAY)
    assert rep.features == () and rep.sampled == 0
    assert rep.to_table().splitlines()[1] == "no logged impressions in the range"


def test_entity_prefixed_names_count_as_the_feature():
    imps = _impressions(as_json=False)
    logged = [{(f"item:{k}" if k == "item_views_1h" else k): v for k, v in row.items()}
              for row in imps.column("features").to_pylist()]
    logged[0]["user:item_views_1h"] = 99.0  # wrong entity type: ignored
    imps = imps.set_column(imps.schema.get_field_index("features"), "features", pa.array(
        [json.dumps({k: v for k, v in r.items() if v is not None}) for r in logged]))
    rep = consistency_report(imps, FS, OFFLINE, _late_table())
    views = rep.feature("item_views_1h")
    assert (views.rows, views.matched) == (18, 12)


# -- list features, logged by fingerprint ------------------------------------------------

RECENT = FeatureSpec(name="item_recent_users", source="views", entity="item_id",
                     aggregation="last_n", value="user_id", windows=(HOUR,), params={"n": 3})
LIST_FS = FeatureSet(features=(VIEWS, RECENT))


def _list_blocks(views: list[dict]) -> pa.Table:
    cols = records_to_columns("views", views)
    rows = []
    for spec in LIST_FS.features:
        res = compute_blocks(spec, cols, T0, T0 + DAY)
        for size in res.by_size:
            ents, st, rp = res.rows(size)
            rows += [(e, spec.key, s, size, r) for e, s, r in zip(ents, st, rp)]
    return pa.table({"entity_type": ["item"] * len(rows), "entity_id": [r[0] for r in rows],
                     "feature_key": [r[1] for r in rows],
                     "start_ms": pa.array([r[2] for r in rows], pa.int64()),
                     "size_ms": pa.array([r[3] for r in rows], pa.int64()),
                     "rep": pa.array([r[4] for r in rows], pa.binary()),
                     "written_ms": pa.array([0] * len(rows), pa.int64())})


def test_list_features_are_compared_by_their_logged_fingerprint():
    """Serving logs a list as ``<name>#fp``; the check recomputes the list and compares.

    i0..i3 log their online list (match); i4's online list missed its late view (late
    data); i2 logs its list reversed (other); the plain ``item_recent_users_1h`` number is
    never looked for, and a list without a fingerprint is not compared.
    """
    from features.fingerprint import fingerprint_name, list_fingerprint

    offline = _scanner(_list_blocks(_on_time_views() + LATE))
    online_scan = _scanner(_list_blocks(_on_time_views()))
    rows = [(f"imp-{item}", item, IMP) for item in ("i0", "i1", "i2", "i3", "i4", "i5")]
    keys = _keys(rows)
    name = "item_recent_users_1h"
    online = backfill_columns(keys, LIST_FS, [name], online_scan)[name]
    logged = []
    for (_, item, _), text in zip(rows, online):
        values = json.loads(text)
        assert values, item  # every item has views in the window
        if item == "i2":
            values = values[::-1]
        entry = {fingerprint_name(name): list_fingerprint(values)}
        logged.append({} if item == "i5" else entry)
    table = keys.append_column("features", pa.array([json.dumps(v) for v in logged]))
    rep = consistency_report(table, LIST_FS, offline, _late_table(), from_ts=T0,
                             to_ts=T0 + DAY)
    (feat,) = rep.features
    assert feat.name == fingerprint_name(name)
    assert (feat.rows, feat.matched, dict(feat.causes)) == (
        5, 3, {"late_data": 1, "missing_blocks": 0, "other": 1})
    assert [m.impression_id for m in feat.examples if m.cause == "other"] == ["imp-i2"]


def test_list_fingerprints_are_exact_doubles_that_tell_order_and_type_apart():
    from features.fingerprint import list_fingerprint

    fp = list_fingerprint(["a", "b"])
    assert fp == int(fp) and 0 <= fp < 2**52
    assert float(np.float64(fp)) == fp and json.loads(json.dumps(fp)) == fp
    assert list_fingerprint(["b", "a"]) != fp
    assert list_fingerprint(["1"]) != list_fingerprint([1])
    assert list_fingerprint(None) == list_fingerprint([])
