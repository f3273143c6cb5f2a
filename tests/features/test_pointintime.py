"""Point-in-time values from offline blocks equal brute force, and never read past the end."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregations import build_aggregation
from features.assembly import aggregate_raw, build_blocks
from features.pointintime import point_in_time, query_ends
from features.spec import FeatureSpec
from features.tiling import window_bounds
from features.timeutil import DAY, HOUR, MINUTE

T0 = 1_764_547_200_000
KINDS = {
    "count": {}, "sum": {}, "mean": {}, "min": {}, "max": {},
    "last_n": {"n": 3}, "approx_distinct": {"lg_k": 12},
}
WINDOWS = (HOUR, 6 * HOUR, DAY, 3 * DAY)


def _spec(kind):
    return FeatureSpec(name=f"f_{kind}", source="views", entity="item_id", aggregation=kind,
                       value=None if kind == "count" else "dwell_ms", windows=WINDOWS,
                       params=KINDS[kind])


def _blocks_table(spec, events):
    agg = build_aggregation(spec)
    rows = {"entity_id": [], "start_ms": [], "size_ms": [], "rep": []}
    for e in sorted({ev[0] for ev in events}):
        ts = np.array([ev[1] for ev in events if ev[0] == e], dtype=np.int64)
        vals = np.array([float(ev[2]) for ev in events if ev[0] == e], dtype=np.float64)
        for size, (starts, reps) in build_blocks(agg, vals if agg.needs_value else None, ts,
                                                 spec.block_sizes).items():
            replist = agg.from_array(reps) if isinstance(reps, np.ndarray) else reps
            for s, r in zip(starts.tolist(), replist):
                rows["entity_id"].append(e)
                rows["start_ms"].append(s)
                rows["size_ms"].append(size)
                rows["rep"].append(agg.to_bytes(r))
    return pa.table({"entity_id": pa.array(rows["entity_id"], pa.string()),
                     "start_ms": pa.array(rows["start_ms"], pa.int64()),
                     "size_ms": pa.array(rows["size_ms"], pa.int64()),
                     "rep": pa.array(rows["rep"], pa.binary())})


events_st = st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 4 * DAY - 1),
                               st.integers(0, 100)), max_size=150)
queries_st = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "zz"]),
                                st.integers(0, 5 * DAY), st.integers(0, 40)), min_size=1,
                      max_size=25)


@pytest.mark.parametrize("kind", list(KINDS))
@settings(max_examples=25, deadline=None)
@given(events=events_st, queries=queries_st)
def test_point_in_time_equals_brute_force(kind, events, queries):
    spec = _spec(kind)
    agg = build_aggregation(spec)
    evs = [(e, T0 + t, v) for e, t, v in events]
    table = _blocks_table(spec, evs)
    ids = [q[0] for q in queries]
    ts = np.array([T0 + q[1] for q in queries], dtype=np.int64)
    wms = ts - np.array([q[2] for q in queries]) * 5 * MINUTE  # watermark lags t
    ends = query_ends(ts, wms, spec.streaming_block)
    got = point_in_time(spec, WINDOWS, ids, ends, table)
    for wv, w in zip(got, WINDOWS):
        for i, e in enumerate(ids):
            wb = window_bounds(int(ends[i]), w, int(ends[i]), spec.block_sizes)
            sel = [(t, v) for x, t, v in evs if x == e]
            rep = aggregate_raw(agg, [float(v) for _, v in sel] if agg.needs_value else None,
                                np.array([t for t, _ in sel], dtype=np.int64), wb.start, wb.end)
            want = agg.finalize(rep)
            if kind == "last_n":
                assert wv.lists[i] == (want or [])
            elif want is None:
                assert wv.missing[i] and wv.values[i] == spec.default
            else:
                assert wv.values[i] == pytest.approx(want), (e, w)


@pytest.mark.parametrize("kind", list(KINDS))
def test_events_at_or_after_the_watermark_never_count(kind):
    """
    wm = 12:00 (logged)      t = 12:07
    events:  11:58 ✓   11:59:59.999 ✓ | 12:00:00.000 ✗   12:03 ✗   12:06 ✗  (at/after wm)
    """
    spec = _spec(kind)
    wm = T0 + 12 * HOUR
    before = [("a", wm - 2 * MINUTE, 10), ("a", wm - 1, 20)]
    planted = [("a", wm, 1000), ("a", wm + 3 * MINUTE, 2000), ("a", wm + 6 * MINUTE, 3000)]
    ends = query_ends(np.array([wm + 7 * MINUTE]), np.array([wm]), spec.streaming_block)
    clean = point_in_time(spec, WINDOWS, ["a"], ends, _blocks_table(spec, before))
    leaky = point_in_time(spec, WINDOWS, ["a"], ends, _blocks_table(spec, before + planted))
    for a, b in zip(clean, leaky):
        if a.lists is not None:
            assert a.lists == b.lists
        else:
            assert a.values.tolist() == b.values.tolist()
