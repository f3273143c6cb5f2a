"""The catalog's author change log: what a serving snapshot asks to know which items moved."""

from __future__ import annotations

from serving.catalog import ItemCatalog


def test_author_changes_are_reported_once_and_the_log_stays_bounded():
    catalog = ItemCatalog()
    catalog.MAX_CHANGES = 4
    for i in range(3):
        catalog.upsert(f"i{i}", "a1", "t", 0)
    v = catalog.version
    catalog.upsert("i0", "a1", "t2", 5)  # topic only: not an author change
    catalog.upsert("i1", "a2", "t", 0)
    catalog.upsert("i2", "", "t", 0, deleted=True)
    assert catalog.changed_since(v) == ["i1", "i2"]
    assert catalog.changed_since(catalog.version) == []
    for k in range(50):  # churn: the log keeps max(known items, MAX_CHANGES) entries
        catalog.upsert("i0", f"b{k}", "t", 0)
    assert len(catalog._changes) <= 4
    # a reader older than the kept log is told every item may have moved, never too few
    assert set(catalog.changed_since(v)) >= {"i0", "i1"}
    catalog.forget_before(catalog.version)
    assert catalog.changed_since(catalog.version) == [] and catalog._changes == []
