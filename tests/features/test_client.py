"""The feature client on a real store filled by the real blocks flow, against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from dataflows.blocks import BlocksFlowConfig, build_blocks_flow
from dataflows.runner import run_flow
from features.aggregations import build_aggregation
from features.assembly import aggregate_raw
from features.cache import FeatureCache
from features.client import FeatureClient, HistoricalReadError, UnknownFeatureError
from features.expressions import parse_derived, parse_filter
from features.preassembled import refresh_preassembled
from features.reference import reference_late
from features.spec_loader import load_features
from features.store import open_store
from features.tiling import window_bounds
from features.timeutil import MINUTE
from tessera.synth import generate_records
from tessera.synth.sinks import partition_of
from tests.dataflows.flowcheck import LATENESS_MS, produce_world, small_world

pytestmark = pytest.mark.integration
FEATURES = load_features("features.yaml")


@pytest.fixture(scope="module")
def filled(tmp_path_factory, request):
    """A store filled by the blocks flow from a small generated world, and its raw events."""
    from tessera.broker import EmbeddedBroker
    from tessera.topics import PLATFORM_TOPICS, create_topics

    tmp = tmp_path_factory.mktemp("client")
    broker = EmbeddedBroker(state_dir=tmp / "broker")
    bootstrap = broker.start().bootstrap
    try:
        create_topics(bootstrap, PLATFORM_TOPICS, partitions=3)
        world = small_world(total_views=4_000, malformed_fraction=0.0)
        produce_world(bootstrap, world)
        url = f"lmdb://{tmp}/store"
        run_flow(build_blocks_flow(BlocksFlowConfig(
            bootstrap=bootstrap, store_url=url, features=FEATURES, bounded=True, shards=2,
            lateness_ms=LATENESS_MS)))
    finally:
        broker.stop(timeout_s=1)
    # on-time events per topic, as the flow saw them (late ones decided per partition)
    records = generate_records(world)
    on_time = {}
    for topic in FEATURES.sources:
        parts: dict[int, list] = {}
        for r in records[topic]:
            parts.setdefault(partition_of(r["user_id"], 3), []).append(r)
        on_time[topic] = [r for p in parts.values()
                          for r, late in zip(p, reference_late(p, LATENESS_MS)) if not late]
    store = open_store(url, readonly=True)
    yield store, on_time
    store.close()


def brute_force(on_time, spec, window, entity_id, end):
    """The value of one window feature over the raw events in its bounds."""
    wb = window_bounds(end, window, end, spec.block_sizes)
    flt = parse_filter(spec.filter) if spec.filter else None
    agg = build_aggregation(spec)
    evs = [r for r in on_time[spec.source] if r[spec.entity] == entity_id
           and (flt is None or flt.evaluate_row(r))]
    vals = [r[spec.value] if spec.value else None for r in evs]
    if agg.needs_value and not isinstance(vals[0] if vals else 0, str):
        vals = [float(v) for v in vals]
    rep = aggregate_raw(agg, np.array(vals, dtype=object) if agg.needs_value else None,
                        np.array([r["event_ts"] for r in evs], dtype=np.int64), wb.start, wb.end)
    return agg.finalize(rep), bool(evs)


def _check(result, on_time, entity_type):
    col = {n: j for j, n in enumerate(result.names)}
    specs = {}
    for f in FEATURES.features:
        for w in f.windows:
            specs[f.window_name(w)] = (f, w)
    for i, e in enumerate(result.ids):
        for name in result.names:
            if name in specs:
                spec, w = specs[name]
                want, any_events = brute_force(on_time, spec, w, e, result.watermark)
                if spec.aggregation == "last_n":
                    assert result.lists[name][i] == (want or []), (e, name)
                    continue
                got = float(result.values[i, col[name]])
                if want is None:
                    assert got == spec.default and result.missing[i, col[name]], (e, name)
                elif spec.aggregation == "approx_quantile":
                    assert got == pytest.approx(want, rel=0.05, abs=50), (e, name)
                elif spec.aggregation == "approx_distinct":
                    assert got == pytest.approx(want, rel=0.05), (e, name)
                else:
                    assert got == pytest.approx(want, rel=1e-6), (e, name)
            else:  # derived: recompute from brute-force inputs
                d = next(x for x in FEATURES.derived if x.name == name)
                row = {inp: brute_force(on_time, *specs[inp], e, result.watermark)[0] or 0.0
                       for inp in d.inputs}
                want = parse_derived(d.expression).evaluate_row(row, default=d.default)
                assert float(result.values[i, col[name]]) == pytest.approx(want, rel=1e-5)


def test_values_equal_brute_force_for_random_ids_features_and_times(filled):
    store, on_time = filled
    client = FeatureClient(store, FEATURES)
    rng = np.random.default_rng(3)
    wm = min(store.get_watermarks("blocks/").values())
    for entity_type, field in (("item", "item_id"), ("user", "user_id")):
        ids_all = sorted({r[field] for r in on_time["views"]})
        names_all = client.names_for(entity_type)
        for _ in range(4):
            ids = list(rng.choice(ids_all, size=12)) + ["never-seen"]
            names = list(rng.choice(names_all, size=min(6, len(names_all)), replace=False))
            at = int(wm + rng.integers(-5, 120) * MINUTE)  # around and after the watermark
            result = client.get_features(entity_type, ids, names, at=at)
            assert result.watermark <= max(at, wm)
            _check(result, on_time, entity_type)
            j = result.ids.index("never-seen")
            assert result.missing[j].all()


def test_preassembled_and_assembled_reads_agree(filled, tmp_path):
    store, on_time = filled
    # copy the blocks into a writable store of our own to add pre-assembled values
    import shutil
    src = store.path if hasattr(store, "path") else None
    assert src is not None
    shutil.copytree(src, tmp_path / "store")
    with open_store(f"lmdb://{tmp_path}/store") as rw:
        report = refresh_preassembled(rw, FEATURES, "item")
        assert report.entities > 10
        client = FeatureClient(rw, FEATURES)
        ids = [r["item_id"] for r in on_time["views"][:200:7]]
        names = [n for n in report.columns][:10] + ["item_ctr_1d"]
        pre = client.get_features("item", ids, names)
        blocks = client.get_features("item", ids, names, use_preassembled=False)
        assert pre.sources["preassembled"] == len(set(ids))
        assert blocks.sources["blocks"] == len(set(ids))
        assert pre.watermark == blocks.watermark
        np.testing.assert_allclose(pre.values, blocks.values, rtol=1e-6)
        assert (pre.missing == blocks.missing).all()


def test_repeated_ids_are_read_once_and_broadcast(filled):
    store, on_time = filled
    cache = FeatureCache()
    client = FeatureClient(store, FEATURES, cache=cache)
    user = on_time["views"][0]["user_id"]
    res = client.get_features("user", [user] * 50, ["user_views_1d", "user_clicks_7d"])
    assert res.sources["blocks"] == 1 and res.values.shape == (50, 2)
    assert (res.values == res.values[0]).all()
    again = client.get_features("user", [user], ["user_views_1d", "user_clicks_7d"])
    assert again.sources["cache"] == 1 and cache.stats["user"].hits == 1
    np.testing.assert_array_equal(again.values[0], res.values[0])


def test_unknown_and_wrong_entity_features_are_clear_errors(filled):
    store, _ = filled
    client = FeatureClient(store, FEATURES)
    with pytest.raises(UnknownFeatureError, match="unknown features for entity type 'item': "
                                                  "user_views_1d, nope"):
        client.get_features("item", ["i1"], ["item_views_1h", "user_views_1d", "nope"])


def test_reads_far_behind_the_watermark_are_refused(filled):
    store, _ = filled
    client = FeatureClient(store, FEATURES)
    wm = min(store.get_watermarks("blocks/").values())
    with pytest.raises(HistoricalReadError, match="compute past values offline") as info:
        client.get_features("item", ["i1"], ["item_views_1h"], at=wm - 3_600_000)
    # one watermark number: the message shows the aligned end a read reports
    shown = client.get_features("item", ["i1"], ["item_views_1h"], at=wm).watermark
    assert f"watermark {shown} (" in str(info.value)


def test_stale_features_are_flagged_in_the_result(filled):
    store, on_time = filled
    client = FeatureClient(store, FEATURES)
    wm = min(store.get_watermarks("blocks/").values())
    fresh = client.get_features("item", ["i1"], ["item_views_1h"], at=wm + MINUTE)
    assert fresh.stale == ()
    late = client.get_features("item", ["i1"], ["item_views_1h"], at=wm + 3 * 3_600_000)
    assert late.stale == ("item_views_1h",) and late.lag_ms >= 3 * 3_600_000 - 5 * MINUTE


def test_a_request_reads_every_family_at_one_snapshot_end(filled, tmp_path):
    """User, item and author reads of one request share one window end, the lowest trusted
    one over every family read, and every value is the brute-force value at that end."""
    import shutil

    store, on_time = filled
    shutil.copytree(store.path, tmp_path / "store")
    with open_store(f"lmdb://{tmp_path}/store") as rw:
        refresh_preassembled(rw, FEATURES, "item")  # its own end: the snapshot must not mix
        client = FeatureClient(rw, FEATURES)
        reads = [("user", ["user_views_1d", "user_clicks_7d", "user_recent_topics_7d"]),
                 ("item", ["item_views_1h", "item_ctr_1d"]),
                 ("author", ["author_views_7d"])]
        marks = rw.get_watermarks("blocks/")
        families = {f"blocks/{f.source}/{f.entity}/" for et, names in reads
                    for r in client._window_refs(client.resolve(et, names)) for f in [r.spec]}
        assert len({p.split("/")[1] for p in families}) > 1  # views and engagements
        low = min(v for k, v in marks.items() if any(k.startswith(p) for p in families))
        end = client.snapshot_end(reads, at=low + 86_400_000)
        assert end == low - low % (5 * MINUTE)
        assert end < max(marks.values())  # some family is ahead: its own end would differ
        for entity_type, names in reads:
            field = f"{entity_type}_id"
            ids = sorted({r[field] for r in on_time["views"]})[:15]
            res = client.get_features(entity_type, ids, names, end=end)
            assert res.watermark == end
            _check(res, on_time, entity_type)
        with pytest.raises(HistoricalReadError, match="snapshot_end"):
            client.get_features("item", ["i1"], ["item_views_1h"], end=max(marks.values()) + 1)


def test_snapshot_gathers_exactly_what_the_read_returns(filled):
    """An item snapshot (item and author columns) at one end holds, row for row, the values
    ``get_features`` returns at that end; ids it lacks are -1."""
    from features.snapshot import build_snapshot

    store, on_time = filled
    client = FeatureClient(store, FEATURES)
    author_of = {r["item_id"]: r["author_id"] for r in on_time["views"]}
    ids = sorted(author_of)[:300]
    item_names = ["item_views_1h", "item_views_1d", "item_dwell_mean_1d", "item_ctr_1d",
                  "item_unique_viewers_1d"]
    item_names = [n for n in item_names if n in client.names_for("item")]
    author_names = client.names_for("author")
    end = client.snapshot_end([("item", item_names), ("author", author_names)])
    authors = [author_of[i] for i in ids]
    snap = build_snapshot(client, "item", ids[::-1] + ids[:10], item_names, end,
                          joined=("author", authors[::-1] + authors[:10], author_names))
    assert snap.names == tuple(item_names) + tuple(author_names)
    assert len(snap.ids) == len(ids)  # sorted, each id once
    query = ids[50:250] + ["no-such-item", ids[7]]
    rows = snap.rows(query)
    assert rows[-2] == -1 and (np.delete(rows, -2) >= 0).all()
    assert snap.ids[rows[-1]] == ids[7]
    known = [q for q in query if q != "no-such-item"]
    got = snap.columns(snap.rows(known))
    want_items = client.get_features("item", known, item_names, end=end)
    want_authors = client.get_features("author", [author_of[i] for i in known], author_names,
                                       end=end)
    for j, n in enumerate(item_names):
        np.testing.assert_array_equal(got[n], want_items.values[:, j], err_msg=n)
    for j, n in enumerate(author_names):
        np.testing.assert_array_equal(got[n], want_authors.values[:, j], err_msg=n)
    assert np.count_nonzero(got["item_views_1d"]) > 0  # real values, not only defaults


def test_snapshot_built_in_a_child_process_equals_the_one_built_here(filled):
    """``SnapshotBuilder`` (serving's default: the build off the serving interpreter) gives
    the same snapshot as ``build_snapshot`` on this thread; a bad name raises here."""
    from features.errors import TesseraError
    from features.snapshot import build_snapshot
    from features.snapshot_process import SnapshotBuilder

    store, on_time = filled
    client = FeatureClient(store, FEATURES)
    author_of = {r["item_id"]: r["author_id"] for r in on_time["views"]}
    ids = sorted(author_of)[:200]
    item_names = ("item_views_1h", "item_views_1d", "item_ctr_1d")
    author_names = tuple(client.names_for("author"))
    end = client.snapshot_end([("item", item_names), ("author", author_names)])
    joined = ("author", [author_of[i] for i in ids], author_names)
    here = build_snapshot(client, "item", ids, item_names, end, joined=joined)
    builder = SnapshotBuilder(f"lmdb://{store.path}", "features.yaml")
    try:
        there = builder.build("item", ids, item_names, end, joined=joined)
        assert (there.entity_type, there.end, there.names) == (here.entity_type, here.end,
                                                                here.names)
        np.testing.assert_array_equal(there.ids, here.ids)
        np.testing.assert_array_equal(there.values, here.values)
        np.testing.assert_array_equal(there.missing, here.missing)
        np.testing.assert_array_equal(there.rows(ids[::-1]), here.rows(ids[::-1]))
        with pytest.raises(TesseraError):
            builder.build("item", ids, ("no_such_feature_1d",), end)
    finally:
        builder.close()


def test_watermarks_are_reused_only_for_their_ttl(filled):
    """``watermark_ttl_ms`` (serving): a request end read again within the TTL comes from
    the watermarks read before; after it, or with the default 0, from the store."""
    store, _ = filled
    calls = []

    class Counting:
        def __getattr__(self, name):
            return getattr(store, name)

        def get_watermarks(self, prefix=""):
            calls.append(prefix)
            return store.get_watermarks(prefix)

    reads = [("user", ["user_views_1d"]), ("item", ["item_views_1d"])]
    plain = FeatureClient(Counting(), FEATURES)
    end = plain.snapshot_end(reads)
    assert plain.snapshot_end(reads) == end and len(calls) == 2
    with pytest.raises(ValueError, match="watermark_ttl_ms"):
        FeatureClient(store, FEATURES, watermark_ttl_ms=-1)
    now = [end + 1]
    cached = FeatureClient(Counting(), FEATURES, watermark_ttl_ms=50, clock=lambda: now[0])
    calls.clear()
    assert cached.snapshot_end(reads) == end and cached.snapshot_end(reads) == end
    assert len(calls) == 1
    now[0] += 49
    assert cached.snapshot_end(reads) == end and len(calls) == 1
    now[0] += 1
    assert cached.snapshot_end(reads) == end and len(calls) == 2


def test_the_cache_tolerates_an_entry_removed_by_another_thread_mid_lookup():
    """Two request threads can see the same expired entry; the one that removes it second
    must get a miss, not a KeyError (seen as a 500 from /v1/feed under ``tessera up``).
    The clock, read inside ``get``, removes the entry here as the other thread would."""
    now = [0.0]
    cache = FeatureCache(ttl_ms={"item": 10}, max_entries=2)

    def clock() -> float:
        if now[0] > 100:  # the other thread's lookup of the expired entry removes it first
            cache._data.pop(("item", "k"), None)
        return now[0]

    cache.clock = clock
    cache.put("item", "k", 1.0)
    now[0] = 1_000.0
    assert cache.get("item", "k") is None
    assert cache.stats["item"].misses == 1
