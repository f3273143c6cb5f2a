"""The catalog's trending, fresh and per-topic lists, built in the snapshot builder's child
process instead of on the serving interpreter.

A refresh over 100,000 items (list the store's items, read their popularity, sort and group
them) is about half a second of Python. On a thread of the serving process it held the
interpreter lock against the request threads: ``bench/serving.py`` saw one stall of about a
second every refresh (30 s) and a p99 of 93 ms at 50 requests/s at full size. The child
keeps a catalog of its own (its own reader of the ``items`` topic) and a read-only store,
and returns only the lists and the popularity arrays (``CatalogSnapshot``).
"""

from __future__ import annotations

import time

from features.snapshot_process import SnapshotBuilder
from serving.catalog import CatalogFollower, CatalogSnapshot, ItemCatalog, refresh_lists
from serving.frame import CandidateFrame, build_frame

#: how long the child's first build waits for its reader to reach the end of ``items``
CATCH_UP_WAIT_S = 30.0

#: the child reads the store this many items at a time, sleeping ``PAUSE_S`` in between: a
#: refresh of 100,000 items is ~0.3 s of CPU spread over ~1 s, never a long burst
CHUNK = 2_000
PAUSE_S = 0.01

_CHILD: dict[tuple[str, str], tuple[ItemCatalog, CatalogFollower, object]] = {}


def _build_in_child(bootstrap: str, store_url: str,
                    topic: str) -> tuple[CatalogSnapshot, CandidateFrame]:
    """Child side: follow ``topic`` from the first call on, then rebuild from the store;
    the lists and their frame (``serving.frame``: ids, authors and topics as arrays)."""
    key = (bootstrap, store_url)
    if key not in _CHILD:
        from features.store import open_store

        catalog = ItemCatalog()
        follower = CatalogFollower(bootstrap, catalog, topic=topic).start()
        _CHILD[key] = (catalog, follower, open_store(store_url, readonly=True))
        follower.caught_up.wait(CATCH_UP_WAIT_S)
    catalog, _, store = _CHILD[key]
    snap = refresh_lists(catalog, store, pause_s=PAUSE_S, chunk=CHUNK)
    ids = snap.popularity.ids.tolist()
    frame = build_frame(snap.popularity.ids, catalog.authors(ids), catalog.topics(ids),
                        trending=snap.trending, fresh=snap.fresh, by_topic=snap.by_topic,
                        catalog_version=0)  # the parent sets its own catalog's version
    return snap, frame


class CatalogBuilder:
    """Builds ``CatalogSnapshot``s in ``process``'s child; ``build()`` blocks until done."""

    def __init__(self, process: SnapshotBuilder, bootstrap: str, topic: str = "items"):
        self.process = process
        self.bootstrap = bootstrap
        self.topic = topic
        self.last_build_s = 0.0

    def build(self) -> tuple[CatalogSnapshot, CandidateFrame]:
        """The lists as of now and their frame (the first call also waits for the child's
        reader to catch up, at most ``CATCH_UP_WAIT_S``). Store errors are raised here as
        ``TesseraError``."""
        t0 = time.perf_counter()
        snap = self.process.run(_build_in_child, self.bootstrap, self.process.store_url,
                                self.topic)
        self.last_build_s = time.perf_counter() - t0
        return snap
