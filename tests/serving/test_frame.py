"""Candidates as positions in the catalog's frame: the merge, the seen filter and the
metadata columns give what the id-by-id path gave."""

from __future__ import annotations

import numpy as np

from serving.catalog import ItemCatalog
from serving.config import ServingConfig
from serving.frame import SOURCES, build_frame, factorize
from serving.requests import FeedRequest


def _catalog(n: int = 60) -> ItemCatalog:
    catalog = ItemCatalog()
    for k in range(n):
        catalog.upsert(f"i{k:03d}", f"a{k % 7}", f"t{k % 4}" if k % 9 else "", 1_000 + k)
    popularity = {f"i{k:03d}": float((k * 37) % 11) for k in range(n)}
    popularity["store-only"] = 20.0  # blocks in the store, not (yet) on the items topic
    catalog.publish(catalog.rebuild(popularity, top=25, per_topic=8))
    return catalog


def test_factorize_codes_in_first_seen_order():
    col = factorize(["b", "a", "b", "", "a"])
    assert col.codes.tolist() == [0, 1, 0, 2, 1]
    assert col.table.values.tolist() == ["b", "a", ""]
    assert list(col) == ["b", "a", "b", "", "a"]


def test_frame_lists_and_columns_match_the_catalog():
    catalog = _catalog()
    snap, frame = catalog.snapshot, catalog.frame
    assert frame.ids_at(frame.trending) == list(snap.trending)
    assert frame.ids_at(frame.fresh) == list(snap.fresh)
    assert {t: frame.ids_at(p) for t, p in frame.by_topic.items()} == \
        {t: list(v) for t, v in snap.by_topic.items()}
    ids = frame.ids.tolist()
    authors, topics = catalog.candidate_columns(frame)
    assert list(authors) == catalog.authors(ids) and list(topics) == catalog.topics(ids)
    assert frame.positions(["i005", "nope", "store-only"]).tolist() == \
        [ids.index("i005"), -1, ids.index("store-only")]


def test_changes_after_the_frame_are_patched_in_once_per_version():
    catalog = _catalog()
    frame = catalog.frame
    before = catalog.candidate_columns(frame)
    assert catalog.candidate_columns(frame) is before  # cached: same version
    catalog.upsert("i003", "a-new", "t-new", 5)  # re-authored and re-topiced
    catalog.upsert("i010", "", "", 0, deleted=True)
    catalog.upsert("i999", "a1", "t1", 7)  # a new item: not in this frame
    authors, topics = catalog.candidate_columns(frame)
    ids = frame.ids.tolist()
    assert list(authors) == catalog.authors(ids) and list(topics) == catalog.topics(ids)
    assert authors[ids.index("i003")] == "a-new" and topics[ids.index("i010")] == ""
    assert list(frame.authors)[ids.index("i003")] == "a3"  # the frame itself is immutable


def test_candidates_merge_in_generator_order_each_item_once(monkeypatch):
    """The reference: the id-by-id merge this replaced (each generator offers up to its
    limit, duplicates included; an item keeps the first source that offered it)."""
    from serving.metrics import ServingMetrics
    from serving.pipeline import FeedPipeline
    from serving.ranking import ModelBundle

    catalog = _catalog()
    limits = {"ann": 5, "topics": 9, "trending": 12, "fresh": 10}
    pipe = FeedPipeline(ServingConfig(candidate_limits=limits), client=None, catalog=catalog,
                        logger=None, metrics=ServingMetrics())

    class Retrieval:
        def search(self, seq, k, user):
            return ["i042", "nope", "i001", "i042", "store-only", "i050", "i051"]

    seq = ["i001", "i005", "i013"]
    for feed_type in ("HOME", "FOLLOW"):
        req = FeedRequest(user_id=f"u-{feed_type}", feed_type=feed_type, limit=10)
        got = pipe.candidates(req, seq, ModelBundle(retrieval=Retrieval()))
        snap, out = catalog.snapshot, {}

        def add(ids, source, limit, out=out):
            for n, i in enumerate(ids):
                if n >= limit:
                    break
                out.setdefault(i, source)

        add(Retrieval().search(seq, 5, None), "ann", 5)
        from collections import Counter

        topics = Counter(t for t in catalog.topics(seq) if t)
        per = max(1, 9 // max(1, min(3, len(topics))))
        for topic, _ in topics.most_common(3):
            add(snap.by_topic.get(topic, ()), "topics", per)
        if feed_type == "FOLLOW":
            followed = {a for a in catalog.authors(seq) if a}
            add([i for i in snap.trending if (catalog.meta(i) or ("",))[0] in followed],
                "follow", 9)
        add(snap.trending, "trending", 12)
        add(snap.fresh, "fresh", 10)
        out.pop("nope")  # not in the catalog: no metadata to rank it with
        assert list(zip(got.ids(), (SOURCES[s] for s in got.source))) == list(out.items())
        assert "follow" in {SOURCES[s] for s in got.source} or feed_type == "HOME"
        unseen = got.without(seq)
        assert unseen.ids() == [i for i in got.ids() if i not in seq]
        assert pipe.candidates(req, seq, ModelBundle(retrieval=Retrieval())) is got  # cached
    catalog.publish(catalog.snapshot)  # a new frame: the cached candidates are not reused
    assert pipe.candidates(req, seq, ModelBundle(retrieval=Retrieval())) is not got


def test_an_empty_catalog_gives_no_candidates():
    catalog = ItemCatalog()
    frame = build_frame(np.zeros(0, dtype="<U1"), [], [], trending=(), fresh=(), by_topic={},
                        catalog_version=0)
    assert len(frame) == 0 and len(catalog.frame) == 0
    from serving.metrics import ServingMetrics
    from serving.pipeline import FeedPipeline
    from serving.ranking import ModelBundle

    pipe = FeedPipeline(ServingConfig(), client=None, catalog=catalog, logger=None,
                        metrics=ServingMetrics())
    got = pipe.candidates(FeedRequest(user_id="u1", feed_type="HOME", limit=5), ["x"],
                          ModelBundle())
    assert len(got) == 0 and got.without(["x"]).ids() == []


def test_serving_sets_the_switch_interval_it_is_configured_with_and_restores_it(tmp_path):
    """``gil_switch_ms``: the interpreter's switch interval while a server runs (checked
    in range at definition), the previous one back when it closes."""
    import sys

    import pytest

    from serving.app import ServingState

    for bad in (0, -1, 500):
        with pytest.raises(ValueError, match="gil_switch_ms"):
            ServingConfig(gil_switch_ms=bad)
    with pytest.raises(ValueError, match="watermark_ttl_ms"):
        ServingConfig(watermark_ttl_ms=-1)
    from features.store import open_store

    open_store(f"lmdb://{tmp_path}/store").close()  # the writer creates it
    before = sys.getswitchinterval()
    st = ServingState(ServingConfig(store_url=f"lmdb://{tmp_path}/store", gil_switch_ms=2.0,
                                    spool_dir=tmp_path / "spool", registry_dir=tmp_path / "r",
                                    feature_snapshot=False))
    try:
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        st.close()
    assert sys.getswitchinterval() == pytest.approx(before)


def test_a_refreshed_frame_over_the_same_items_is_paired_with_the_snapshot_not_rebuilt():
    """Every catalog refresh publishes a new frame; over the same items the keeper pairs it
    with the snapshot it has (its rows are the same positions) instead of rebuilding."""
    from serving.snapshots import SnapshotKeeper

    catalog = _catalog()
    builds = []

    class Client:
        def snapshot_end(self, reads):
            return 300_000

        def get_features(self, entity_type, ids, names, end):
            builds.append(len(ids))
            from features.client import FeatureVectors

            n = len(ids)
            return FeatureVectors(entity_type=entity_type, ids=list(ids), names=list(names),
                                  values=np.arange(n, dtype=np.float32).reshape(n, 1),
                                  missing=np.zeros((n, 1), dtype=bool), watermark=end, at=end,
                                  stale=(), lag_ms=0, sources={}, lists={})

    keeper = SnapshotKeeper(Client(), catalog, lambda: (("item_views_1d",), ()))
    first = keeper.refresh()
    assert first.frame is catalog.frame and builds
    n_builds = len(builds)
    catalog.publish(catalog.snapshot)  # a refresh: a new frame over the same items
    second = keeper.refresh()
    assert len(builds) == n_builds and second.frame is catalog.frame
    assert second.features is first.features
    pos = catalog.frame.positions(["i007", "i030"])
    np.testing.assert_array_equal(keeper.rows_at(second, catalog.frame, pos), pos)
    catalog.upsert("new-item", "a1", "t1", 5)  # another item set: rebuilt over it
    catalog.publish(catalog.rebuild({"new-item": 1.0}))
    third = keeper.refresh()
    assert len(builds) > n_builds and "new-item" in third.features.ids.tolist()


def test_a_refresh_over_the_same_items_carries_the_tables_and_their_hashes_over():
    """A refreshed frame shares the ids array and the code tables of the frame before it
    when they hold the same values, so hash buckets and snapshot rows are not computed
    again by the first requests after every refresh; a changed table is not shared."""
    catalog = _catalog()
    old = catalog.frame
    buckets = old.items.hashed(1_000)
    assert (buckets >= 0).all()
    catalog.publish(catalog.snapshot)  # a refresh: a new frame over the same items
    new = catalog.frame
    assert new is not old and new.ids is old.ids and new.items is old.items
    assert new.authors.table is old.authors.table and new.topics.table is old.topics.table
    np.testing.assert_array_equal(new.items.hashed(1_000), buckets)
    ids = new.ids.tolist()
    authors, topics = catalog.candidate_columns(new)
    assert list(authors) == catalog.authors(ids) and list(topics) == catalog.topics(ids)

    catalog.upsert("i000", "a-brand-new", "t0", 1_000)  # a new author value
    catalog.publish(catalog.snapshot)  # the catalog builds the frame from its metadata
    renamed = catalog.frame
    assert renamed.ids is old.ids and renamed.authors.table is not old.authors.table
    assert list(renamed.authors) == catalog.authors(ids)

    catalog.upsert("i999", "a1", "t1", 7)
    catalog.publish(catalog.rebuild({"i999": 1.0}))  # other items: nothing shared
    assert catalog.frame.ids is not old.ids and catalog.frame.items is not old.items
