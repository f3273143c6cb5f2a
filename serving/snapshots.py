"""Keeps the serving process's item feature snapshot at the newest window end.

A background thread checks the request end (``FeatureClient.snapshot_end`` over the item
and author features the loaded models read) every ``interval_s``; when it moved, or the
models now read other features, it builds a new ``FeatureSnapshot`` of every catalog item
(its own features and its author's, read at that end) and publishes it with one
assignment. A request whose end equals the snapshot's gathers from it; any other request,
and items the snapshot does not hold, read the store at the request's end as before, so a
snapshot changes how fast values are found, never which values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from features.client import FeatureClient
from features.errors import TesseraError
from features.snapshot import FeatureSnapshot, build_snapshot
from features.store.base import NO_WATERMARK
from serving.catalog import ItemCatalog
from tessera.logs import get_logger

log = get_logger("serving.snapshots")


class SnapshotKeeper:
    """Owns ``current``: the item snapshot (item + author columns) or None."""

    def __init__(self, client: FeatureClient, catalog: ItemCatalog,
                 names: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]], *,
                 interval_s: float = 1.0, metrics=None):
        self.client = client
        self.catalog = catalog
        self.names = names  # () -> (item feature names, author feature names)
        self.interval_s = interval_s
        self.metrics = metrics
        self.current: FeatureSnapshot | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="feature-snapshot",
                                        daemon=True)

    def start(self) -> SnapshotKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def matching(self, end: int, names: tuple[str, ...]) -> FeatureSnapshot | None:
        """The snapshot, if it holds exactly ``names`` at exactly ``end``."""
        snap = self.current
        if snap is not None and snap.end == end and snap.names == names:
            return snap
        return None

    def refresh(self) -> FeatureSnapshot | None:
        """Build a new snapshot if the end or the names moved; return the current one."""
        item_names, author_names = self.names()
        if not item_names and not author_names:
            return self.current
        end = self.client.snapshot_end([("item", item_names), ("author", author_names)])
        if end == NO_WATERMARK:
            return self.current
        if self.matching(end, item_names + author_names) is not None:
            return self.current
        ids = self.catalog.item_ids()
        if not ids:
            return self.current
        snap = build_snapshot(self.client, "item", ids, item_names, end,
                              joined=("author", self.catalog.authors(ids), author_names))
        self.current = snap
        log.info("feature_snapshot_built", end=end, items=len(snap.ids),
                 columns=len(snap.names), build_s=round(snap.build_s, 3),
                 mb=round(snap.nbytes / 2**20, 2))
        return snap

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.refresh()
            except (TesseraError, ValueError) as exc:  # keep serving from the store
                log.warning("feature_snapshot_failed", error=str(exc)[:300])
            except Exception as exc:  # a bug must not kill the thread silently
                log.exception("feature_snapshot_failed", error=str(exc)[:300])
            self._stop.wait(self.interval_s)
