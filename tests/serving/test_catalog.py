"""The catalog's change log (author or topic): what serving asks to know which items moved."""

from __future__ import annotations

from serving.catalog import ItemCatalog


def test_author_and_topic_changes_are_reported_once_and_the_log_stays_bounded():
    catalog = ItemCatalog()
    catalog.MAX_CHANGES = 4
    for i in range(3):
        catalog.upsert(f"i{i}", "a1", "t", 0)
    v = catalog.version
    catalog.upsert("i0", "a1", "t2", 5)  # topic only: a change too
    catalog.upsert("i0", "a1", "t2", 9)  # creation time only: not a change
    catalog.upsert("i1", "a2", "t", 0)
    catalog.upsert("i2", "", "t", 0, deleted=True)
    assert catalog.changed_since(v) == ["i0", "i1", "i2"]
    assert catalog.changed_since(catalog.version) == []
    for k in range(50):  # churn: the log keeps max(known items, MAX_CHANGES) entries
        catalog.upsert("i0", f"b{k}", "t", 0)
    assert len(catalog._changes) <= 4
    # a reader older than the kept log is told every item may have moved, never too few
    assert set(catalog.changed_since(v)) >= {"i0", "i1"}
    catalog.forget_before(catalog.version)
    assert catalog.changed_since(catalog.version) == [] and catalog._changes == []
    # a published frame's version is kept: its requests patch the items changed after it
    catalog.publish(catalog.rebuild({"i0": 1.0}))
    kept = catalog.version
    catalog.upsert("i1", "a9", "t", 0)
    catalog.forget_before(catalog.version)
    assert catalog.changed_since(kept) == ["i1"]


def test_rebuild_ranks_by_popularity_then_id_whatever_the_arrival_order():
    import random

    items = [(f"i{k}", f"a{k % 3}", f"t{k % 4}" if k % 5 else "", 1_000 + k) for k in range(40)]
    popularity = {f"i{k}": float(k % 7) for k in range(40)}
    popularity["only-in-store"] = 9.0  # popular, not yet on the items topic
    snaps = []
    for seed in (1, 2):
        catalog = ItemCatalog()
        shuffled = items[:]
        random.Random(seed).shuffle(shuffled)
        for item in shuffled:
            catalog.upsert(*item)
        snaps.append(catalog.rebuild(popularity, top=10, per_topic=3))
    a, b = snaps
    assert (a.trending, a.fresh, a.by_topic) == (b.trending, b.fresh, b.by_topic)
    by_score = sorted((i for i, p in popularity.items() if p > 0),
                      key=lambda i: (-popularity[i], i))
    assert a.trending == tuple(by_score[:10])
    assert a.fresh == tuple(f"i{k}" for k in range(39, 29, -1))
    topics = {t for _, _, t, _ in items if t}
    assert set(a.by_topic) == topics
    for t, got in a.by_topic.items():
        members = sorted((i for i, _, tt, _ in items if tt == t),
                         key=lambda i: (-popularity[i], i))
        assert got == tuple(members[:3]), t
    assert a.popularity.of(["only-in-store", "i0", "unknown"]).tolist() == [9.0, 0.0, 0.0]
