"""End to end over real HTTP: a feed request is ranked, its impressions reach Kafka with the
features that were used, an engagement reaches Kafka, and bad requests get a 4xx naming the
field."""

from __future__ import annotations

import time

import httpx
import pytest

from schemas.codec import decode
from schemas.columnar import columns_to_records, decode_message
from tessera.topics import read_to_end

pytestmark = pytest.mark.integration


def _impressions(bootstrap):
    out = []
    for m in read_to_end(bootstrap, "impressions"):
        out.extend(columns_to_records(decode_message(m.value(), "impressions")))
    return out


def test_feed_is_ranked_and_logged_with_its_features(stack):
    before = {r["impression_id"] for r in _impressions(stack.bootstrap)}
    r = httpx.post(f"{stack.base_url}/v1/feed", json={"user_id": "u1", "limit": 15}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    items = body["items"]
    assert len(items) == 15
    assert [i["position"] for i in items] == list(range(15))
    scores = [i["score"] for i in items]
    assert scores == sorted(scores, reverse=True)
    assert len({i["item_id"] for i in items}) == 15
    assert {i["source"] for i in items} <= {"ann", "topics", "follow", "trending", "fresh"}
    assert body["feature_watermark"] > 0 and body["model_versions"]
    # author diversity: at most 2 items per author on the page
    authors = [i["author_id"] for i in items if i["author_id"]]
    assert all(authors.count(a) <= 2 for a in authors)
    # the page's authors (gathered from the catalog frame) are the catalog's
    catalog = stack.server.config.app.state.serving.catalog
    assert [i["author_id"] for i in items] == catalog.authors([i["item_id"] for i in items])

    deadline = time.monotonic() + 20
    logged = []
    while time.monotonic() < deadline:
        logged = [x for x in _impressions(stack.bootstrap) if x["impression_id"] not in before]
        if len(logged) >= 15:
            break
        time.sleep(0.3)
    by_id = {x["impression_id"]: x for x in logged}
    assert set(by_id) == {i["impression_id"] for i in items}
    for it in items:
        imp = by_id[it["impression_id"]]
        assert imp["request_id"] == body["request_id"] and imp["item_id"] == it["item_id"]
        assert imp["feature_watermark"] == body["feature_watermark"]
        assert imp["scores"]["l2"] == pytest.approx(it["score"])
        assert "item_views_1d" in imp["features"] and imp["model_versions"]


def test_engagement_reaches_kafka(stack):
    ev = {"impression_id": "imp-x", "user_id": "u1", "item_id": "i1", "action": "click",
          "event_id": "e-test-1"}
    r = httpx.post(f"{stack.base_url}/v1/events", json=ev, timeout=10)
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [decode(m.value(), topic="engagements")[1] for m in
                 read_to_end(stack.bootstrap, "engagements")
                 if m.value()[:1] == b"\x00" and m.value()[1:5] == (2).to_bytes(4, "big")]
        if any(e["event_id"] == "e-test-1" for e in found):
            return
        time.sleep(0.3)
    raise AssertionError("the engagement did not reach the engagements topic")


@pytest.mark.parametrize("body, status, field", [
    ({}, 422, "user_id"),
    ({"user_id": 7}, 422, "user_id"),
    ({"user_id": "u1", "limit": 1000}, 422, "limit"),
    ({"user_id": "u1", "limit": "10"}, 422, "limit"),
    ({"user_id": "u1", "feed_type": "HOME"}, 422, "feed_type"),
    ({"user_id": "u1", "extra": 1}, 422, "extra"),
    ([1, 2], 422, "body"),
])
def test_bad_feed_requests_name_the_field(stack, body, status, field):
    r = httpx.post(f"{stack.base_url}/v1/feed", json=body, timeout=10)
    assert r.status_code == status
    assert r.json()["field"] == field and r.json()["error"]


def test_malformed_json_and_bad_events(stack):
    r = httpx.post(f"{stack.base_url}/v1/feed", content=b"{nope", timeout=10)
    assert r.status_code == 422 and r.json()["field"] == "body"
    r = httpx.post(f"{stack.base_url}/v1/events", json={"impression_id": "i", "user_id": "u",
                                                         "item_id": "x", "action": "poke"})
    assert r.status_code == 422 and r.json()["field"] == "action"
    r = httpx.post(f"{stack.base_url}/v1/events", json=[{"impression_id": "i", "user_id": "u",
                                                          "item_id": "x", "action": "click",
                                                          "event_ts": -5}])
    assert r.status_code == 422 and r.json()["field"] == "[0].event_ts"


def test_features_endpoint_and_metrics(stack):
    r = httpx.get(f"{stack.base_url}/v1/features",
                  params={"entity": "item", "ids": "t-nope", "names": "item_views_1h"})
    assert r.status_code == 200 and r.json()["rows"][0]["missing"] == ["item_views_1h"]
    r = httpx.get(f"{stack.base_url}/v1/features", params={"entity": "item", "ids": "x",
                                                           "names": "bogus"})
    assert r.status_code == 422 and r.json()["field"] == "names"
    m = httpx.get(f"{stack.base_url}/metrics").text
    assert "tessera_stage_seconds_bucket" in m and "tessera_candidate_survival_ratio" in m
    assert httpx.get(f"{stack.base_url}/openapi.json").json()["openapi"].startswith("3.")


def test_hydration_gathers_from_the_snapshot_what_the_store_read_returns(stack):
    """The serving process builds its item snapshot at the request end; hydrating from it
    gives exactly the store read's values, items it lacks included (read from the store),
    and items whose author changed after it was built (their author's features)."""
    import numpy as np

    st = stack.server.config.app.state.serving
    deadline = time.monotonic() + 60
    while st.snapshots.current is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert st.snapshots.current is not None
    snap = st.snapshots.current.features
    assert len(snap.ids) > 100
    pipe = st.pipeline
    item_names = pipe.models.item_feature_names()
    author_names = pipe.models.author_feature_names()
    from serving.frame import build_frame
    from serving.pipeline import Candidates

    # candidates are positions in a catalog frame: one over these ids (the last one the
    # snapshot lacks), their catalog authors and topics
    ids = sorted([str(i) for i in snap.ids[::7][:300]] + ["t-not-an-item"])
    frame = build_frame(np.array(ids), st.catalog.authors(ids), st.catalog.topics(ids),
                        trending=(), fresh=(), by_topic={}, catalog_version=st.catalog.version)
    cands = Candidates(frame, np.arange(len(ids)), np.zeros(len(ids), dtype=np.int8))
    hits = st.metrics.cache.labels(cache="snapshot", result="hit")._value.get()
    got = pipe._hydrate_items(cands, item_names, author_names, snap.end)
    assert st.metrics.cache.labels(cache="snapshot", result="hit")._value.get() == hits + 1
    want = pipe._read_items(ids, item_names, author_names, snap.end)
    assert set(got) == set(want) == set(snap.names)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    assert np.count_nonzero(got["item_views_1d"]) > 0

    # an item moves to another author after a snapshot was built: the keeper sends it to
    # the store (row -1) until it rebuilds, and the rebuilt snapshot has the new author's
    # values. The stack's models read no author feature, so this keeper reads them all
    # (and only them: its end is the author family's own).
    from serving.snapshots import SnapshotKeeper

    author_names = tuple(st.client.names_for("author"))
    keeper = SnapshotKeeper(st.client, st.catalog, lambda: ((), author_names),
                            catalog_rebuild_s=0.0)
    cur = keeper.refresh()
    feats = cur.features
    ids = [str(i) for i in feats.ids[:400]]
    authors = st.catalog.authors(ids)
    cols = feats.columns(keeper.rows(cur, ids))
    assert (keeper.rows(cur, ids) >= 0).all()
    j = next(i for i, a in enumerate(authors) if a)
    other = next(i for i, a in enumerate(authors)
                 if a and a != authors[j] and any(cols[n][i] != cols[n][j] for n in author_names))
    item, (old_author, topic, created) = ids[j], st.catalog.meta(ids[j])
    st.catalog.upsert(item, authors[other], topic, created)
    try:
        rows = keeper.rows(cur, ids)
        assert rows[j] == -1 and np.count_nonzero(rows < 0) == 1
        rebuilt = keeper.refresh()
        assert rebuilt is not cur and rebuilt.features.end == feats.end
        moved = rebuilt.features.columns(keeper.rows(rebuilt, ids))
        want = st.client.get_features("author", [authors[other]], list(author_names),
                                      end=feats.end)
        for k, n in enumerate(author_names):
            assert moved[n][j] == want.values[0, k] == cols[n][other], n
    finally:
        st.catalog.upsert(item, old_author, topic, created)

    r = httpx.post(f"{stack.base_url}/v1/feed", json={"user_id": "u2", "limit": 5}, timeout=30)
    assert r.status_code == 200, r.text
    if r.json()["feature_watermark"] == snap.end:  # unless the end moved meanwhile
        assert st.metrics.cache.labels(cache="snapshot", result="hit")._value.get() == hits + 2


def test_a_family_read_at_its_own_end_is_not_logged_as_the_requests(stack):
    """A family the client refuses at the request's end (more than READ_LAG_MS ahead of the
    others) is served at its own end, counted, and left out of the logged features: they
    do not belong to the logged end, so the backfill could never reproduce them."""
    from features.client import HistoricalReadError
    from serving.pipeline import FeedPipeline
    from serving.requests import FeedRequest

    st = stack.server.config.app.state.serving

    class ItemsAhead:  # the real client, but item reads at a given end are refused
        def __init__(self, client):
            self.client = client

        def get_features(self, entity_type, ids, names, **kw):
            if entity_type == "item" and kw.get("end") is not None:
                raise HistoricalReadError("item features far ahead of the request's end")
            return self.client.get_features(entity_type, ids, names, **kw)

        def __getattr__(self, name):
            return getattr(self.client, name)

    class Captured:
        def __init__(self):
            self.impressions = []

        def log(self, impressions):
            self.impressions += columns_to_records(impressions)

    def serve(client):
        logger = Captured()
        pipe = FeedPipeline(st.pipeline.config, client, st.catalog, logger, st.metrics)
        pipe.models = st.pipeline.models
        result = pipe.feed(FeedRequest("u1", "EXPLORE", 10))
        assert len(result.items) == 10 and not result.degraded
        return logger.impressions

    splits = st.metrics.degraded.labels(reason="snapshot_split")._value.get()
    normal = serve(st.client)
    assert all("item_views_1d" in i["features"] for i in normal)
    split = serve(ItemsAhead(st.client))
    assert st.metrics.degraded.labels(reason="snapshot_split")._value.get() == splits + 1
    assert split and not any("item_views_1d" in i["features"] for i in split)


def test_the_candidate_lists_built_in_the_child_process_equal_an_in_process_build(stack):
    """With Kafka, the trending, fresh and per-topic lists are built in the background
    process (its own reader of ``items``, its own store handle); they are exactly the lists
    this process would build from the same topic and store."""
    import numpy as np

    from features.store import open_store
    from serving.catalog import CatalogFollower, ItemCatalog, refresh_lists

    st = stack.server.config.app.state.serving
    assert st.catalog_builder is not None and st.catalog_builder.last_build_s > 0
    st.refresh_catalog()  # the child's reader has caught up since the first build
    child = st.catalog.snapshot
    assert len(child.trending) > 0 and len(child.by_topic) > 1 and len(child.fresh) > 0
    catalog = ItemCatalog()
    follower = CatalogFollower(stack.bootstrap, catalog).start()
    try:
        assert follower.caught_up.wait(30)
        with open_store(stack.store_url, readonly=True) as store:
            here = refresh_lists(catalog, store, pause_s=0.0)
    finally:
        follower.stop()
    assert (child.trending, child.fresh, child.by_topic) == \
        (here.trending, here.fresh, here.by_topic)
    np.testing.assert_array_equal(child.popularity.ids, here.popularity.ids)
    np.testing.assert_array_equal(child.popularity.scores, here.popularity.scores)
    top = list(child.trending[:5])
    assert (child.popularity.of(top) > 0).all()
