"""Columnar streaming reps (``Aggregation.new_column``) against the one-value scalar algebra.

Every aggregation folds the same random events two ways: into a ``RepColumn`` in batches,
and one ``map``/``combine`` at a time. Serialized rows must be the scalar rep's bytes (exact
aggregations and small distinct sets), or the same estimate (sketches), through snapshots
and evictions.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from features.aggregations import make_aggregation
from schemas.columnar import DictColumn

WORDS = np.array(["a", "b", "é", "zz", "", "ab", "a\x00", "日本"], dtype=object)

KINDS = [
    ("count", {}), ("sum", {}), ("mean", {}), ("min", {}), ("max", {}),
    ("last_n", {"n": 3}), ("last_n", {"n": 1}),
    ("approx_distinct", {"lg_k": 8}), ("approx_quantile", {"k": 8}),
]


def _batch(rng, rows: int, size: int, strings: bool):
    r = rng.integers(0, rows, size)
    ts = rng.integers(0, 8, size)  # few distinct times: ties are common
    if strings:
        codes = rng.integers(0, len(WORDS), size).astype(np.int32)
        return r, DictColumn(codes, WORDS), WORDS[codes].tolist(), ts
    vals = rng.integers(0, 6, size).astype(np.float64)
    return r, vals, vals.tolist(), ts


def _check(agg, col, ref, rows: np.ndarray) -> None:
    blob, lengths = col.serialize(rows)
    assert len(lengths) == len(rows) and int(lengths.sum()) == len(blob)
    bounds = np.concatenate(([0], np.cumsum(lengths))).tolist()
    for j, r in enumerate(rows.tolist()):
        got_bytes = blob[bounds[j]:bounds[j + 1]]
        want = ref[r]
        if agg.kind == "approx_quantile":
            got = agg.from_bytes(got_bytes)
            assert got.n == want.n
            if want.n:
                assert (got.get_min_value(), got.get_max_value()) == \
                    (want.get_min_value(), want.get_max_value())
        elif agg.kind == "approx_distinct" and not isinstance(want, np.ndarray):
            got = agg.finalize(agg.from_bytes(got_bytes))
            assert abs(got - agg.finalize(want)) <= 0.05 * agg.finalize(want)
        else:
            assert got_bytes == agg.to_bytes(want), (r, agg.from_bytes(got_bytes), want)


@pytest.mark.parametrize(("kind", "params"), KINDS)
@pytest.mark.parametrize("strings", [False, True])
@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_column_matches_scalar_fold(kind, params, strings, seed):
    if strings and kind not in ("last_n", "approx_distinct", "count"):
        return
    agg = make_aggregation(kind, params)
    rng = np.random.default_rng(seed)
    rows = 12
    col = agg.new_column()
    col.resize(rows)
    ref = [agg.identity() for _ in range(rows)]
    used = np.zeros(rows, dtype=bool)
    size = 40 if kind != "approx_distinct" else 200  # past the exact limit (16 at lg_k=8)
    for step in range(6):
        r, values, plain, ts = _batch(rng, rows, int(rng.integers(0, size)), strings)
        col.fold(r, values if agg.needs_value else None, ts)
        for row, v, t in zip(r.tolist(), plain, ts.tolist()):
            ref[row] = agg.combine(ref[row], agg.map(v, t))
        used[r] = True
        if step == 2:  # snapshot and resume
            col = agg.new_column(pickle.loads(pickle.dumps(col.state(rows))))
            col.resize(rows)
        if step % 2:
            _check(agg, col, ref, np.flatnonzero(used))
    keep = np.flatnonzero(used)[::2]
    col.keep(keep)
    _check(agg, col, [ref[r] for r in keep.tolist()], np.arange(len(keep)))


def test_distinct_rows_turn_into_sketches_past_the_limit():
    agg = make_aggregation("approx_distinct", {"lg_k": 8})  # exact up to 16 values
    col = agg.new_column()
    col.resize(2)
    words = np.array([f"user{i}" for i in range(1000)], dtype=object)
    col.fold(np.zeros(1000, np.int64), DictColumn(np.arange(1000, dtype=np.int32), words),
             np.zeros(1000, np.int64))
    col.fold(np.ones(5, np.int64), DictColumn(np.arange(5, dtype=np.int32), words),
             np.zeros(5, np.int64))
    blob, lengths = col.serialize(np.array([0, 1]))
    big, small = agg.from_bytes(blob[:lengths[0]]), agg.from_bytes(blob[lengths[0]:])
    assert not isinstance(big, np.ndarray) and abs(agg.finalize(big) - 1000) < 100
    assert isinstance(small, np.ndarray) and agg.finalize(small) == 5.0
    assert agg.finalize(agg.combine(big, small)) == agg.finalize(big)  # a subset adds nothing


def test_distinct_merges_sets_that_outgrow_the_limit_with_sketches():
    """A window read merges small exact sets whose union is past the limit with a sketch."""
    agg = make_aggregation("approx_distinct", {"lg_k": 8})  # exact up to 16 values
    sets = [agg.group_reduce(np.zeros(10, np.int64), 1,
                             np.array([f"u{b}-{i}" for i in range(10)], dtype=object),
                             np.zeros(10, np.int64))[0] for b in range(3)]
    assert all(isinstance(s, np.ndarray) for s in sets)  # 10 each, 30 together
    sketch = agg.group_reduce(np.zeros(40, np.int64), 1,
                              np.array([f"w{i}" for i in range(40)], dtype=object),
                              np.zeros(40, np.int64))[0]
    assert not isinstance(sketch, np.ndarray)
    merged = agg.combine_many([*sets, sketch])
    assert abs(agg.finalize(merged) - 70) <= 7
    assert agg.finalize(merged) == agg.finalize(agg.combine(agg.combine_many(sets), sketch))


def test_distinct_reads_the_earlier_bare_hll_format():
    import datasketches as ds

    sk = ds.hll_sketch(12)
    for i in range(50):
        sk.update(f"u{i}")
    agg = make_aggregation("approx_distinct", {"lg_k": 12})
    assert agg.finalize(agg.from_bytes(bytes(sk.serialize_compact()))) == 50.0


@pytest.mark.parametrize("k", [8, 200])
def test_kll_images_are_what_datasketches_writes(k):
    import datasketches as ds

    from features.aggregations.sketches import kll_images

    rng = np.random.default_rng(k)
    counts = np.concatenate(([0, 1, 2, k], rng.integers(0, k + 1, 40)))
    values = rng.normal(size=int(counts.sum())).round(3)
    blob, sizes = kll_images(values, counts, k)
    bounds = np.concatenate(([0], np.cumsum(sizes))).tolist()
    starts = np.concatenate(([0], np.cumsum(counts))).tolist()
    for i, c in enumerate(counts.tolist()):
        sk = ds.kll_doubles_sketch(k)
        if c:
            sk.update(values[starts[i]:starts[i] + c])
        assert blob[bounds[i]:bounds[i + 1]] == bytes(sk.serialize())
