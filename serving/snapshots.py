"""Keeps the serving process's item feature snapshot at the newest window end.

A background thread checks the request end (``FeatureClient.snapshot_end`` over the item
and author features the loaded models read) every ``interval_s``. When it moved, the
models now read other features, or the catalog published a frame over other items, it
builds a new ``FeatureSnapshot`` of every item of the catalog's frame (its own features and
its author's, read at that end; row ``r`` is the frame's position ``r``) and publishes it
with one assignment; a refreshed frame over the same items is only paired with it.
Requests take their candidates from the snapshot's frame, so a gather by position finds
their rows. A request whose end equals the snapshot's gathers from it; any other request,
and items the snapshot does not hold, read the store at the request's end as before, so a
snapshot changes how fast values are found, never which values.

The author columns are keyed by each item's author when the snapshot was built. The
catalog counts author changes (an item first seen, re-authored, deleted); a snapshot
remembers the catalog version it was built at, requests read the items changed since then
from the store, and the keeper rebuilds once the catalog moved (at most every
``catalog_rebuild_s``).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from features.client import FeatureClient
from features.errors import TesseraError
from features.snapshot import FeatureSnapshot, build_snapshot
from features.snapshot_process import SnapshotBuilder
from features.store.base import NO_WATERMARK
from serving.catalog import ItemCatalog
from serving.frame import CandidateFrame, positions_in
from tessera.logs import get_logger

log = get_logger("serving.snapshots")


@dataclass(frozen=True)
class ItemSnapshot:
    """A feature snapshot, the catalog version its author keys were taken at, and the
    catalog frame it was built over (row ``r`` is the frame's position ``r``)."""

    features: FeatureSnapshot
    catalog_version: int
    frame: CandidateFrame | None = None


class SnapshotKeeper:
    """Owns ``current``: the item snapshot (item + author columns) or None."""

    def __init__(self, client: FeatureClient, catalog: ItemCatalog,
                 names: Callable[[], tuple[tuple[str, ...], tuple[str, ...]]], *,
                 interval_s: float = 1.0, catalog_rebuild_s: float = 10.0, metrics=None,
                 builder: SnapshotBuilder | None = None):
        self.client = client
        #: builds in a child process when given (the app's default), else on this thread
        self.builder = builder
        self.catalog = catalog
        self.names = names  # () -> (item feature names, author feature names)
        self.interval_s = interval_s
        self.catalog_rebuild_s = catalog_rebuild_s
        self.metrics = metrics
        self.current: ItemSnapshot | None = None
        #: (snapshot, catalog version, stale-row mask) of the last ``_stale_rows``
        self._stale: tuple[ItemSnapshot, int, np.ndarray | None] | None = None
        self._built_at = 0.0
        #: (snapshot, frame, snapshot row of each frame position) of the last ``frame_rows``
        self._frame_rows: tuple[ItemSnapshot, CandidateFrame, np.ndarray] | None = None
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
        if self.builder is not None:
            self.builder.close()

    def matching(self, end: int, names: tuple[str, ...]) -> ItemSnapshot | None:
        """The snapshot, if it holds exactly ``names`` at exactly ``end``."""
        cur = self.current
        if cur is not None and cur.features.end == end and cur.features.names == names:
            return cur
        return None

    def rows(self, snap: ItemSnapshot, ids: list[str]) -> np.ndarray:
        """Row of each of ``ids`` in ``snap``; -1 where it has none or the item's author
        changed after it was built (those are read from the store)."""
        rows = snap.features.rows(ids)
        stale = self._stale_rows(snap)
        if stale is not None and len(rows):
            found = rows >= 0
            rows[found & stale[np.where(found, rows, 0)]] = -1
        return rows

    def rows_at(self, snap: ItemSnapshot, frame: CandidateFrame, pos: np.ndarray) -> np.ndarray:
        """``rows`` for the items at ``pos`` of ``frame``: the positions themselves when
        ``snap`` was built over ``frame``'s ids array (requests use the snapshot's frame;
        a refreshed frame over the same items shares it: ``serving.frame.carry_over``),
        else a gather from a position-to-row map made once per (snapshot, frame)."""
        if snap.frame is not None and snap.frame.ids is frame.ids \
                and len(snap.features.ids) == len(frame.ids):
            rows = np.array(pos, dtype=np.int64)
        else:
            rows = self.frame_rows(snap, frame)[pos]
        stale = self._stale_rows(snap)
        if stale is not None and len(rows):
            found = rows >= 0
            rows[found & stale[np.where(found, rows, 0)]] = -1
        return rows

    def frame_rows(self, snap: ItemSnapshot, frame: CandidateFrame) -> np.ndarray:
        """The snapshot row of every position of ``frame`` (-1 where it has none)."""
        cached = self._frame_rows
        if cached is not None and cached[0] is snap and cached[1] is frame:
            return cached[2]
        rows = positions_in(snap.features.ids, frame.ids)
        self._frame_rows = (snap, frame, rows)
        return rows

    def _stale_rows(self, snap: ItemSnapshot) -> np.ndarray | None:
        """Whether each row of ``snap`` belongs to an item re-authored since it was built
        (None: none is). Computed once per catalog version, not per request: while the
        catalog loads after a snapshot was built, the changed items are the whole catalog."""
        version = self.catalog.version
        cached = self._stale
        if cached is not None and cached[0] is snap and cached[1] == version:
            return cached[2]
        changed = self.catalog.changed_since(snap.catalog_version)
        mask = None
        if changed:
            rows = positions_in(snap.features.ids, changed)
            mask = np.zeros(len(snap.features.ids), dtype=bool)
            mask[rows[rows >= 0]] = True
        self._stale = (snap, version, mask)
        return mask

    def refresh(self) -> ItemSnapshot | None:
        """Build a new snapshot if the end or the names moved, or the catalog's authors did
        (at most every ``catalog_rebuild_s``); return the current one."""
        item_names, author_names = self.names()
        if not item_names and not author_names:
            return self.current
        end = self.client.snapshot_end([("item", item_names), ("author", author_names)])
        if end == NO_WATERMARK:
            return self.current
        frame = self.catalog.frame
        cur = self.matching(end, item_names + author_names)
        if cur is not None and cur.frame is frame and (
                cur.catalog_version == self.catalog.version
                or time.monotonic() - self._built_at < self.catalog_rebuild_s):
            return cur
        if not len(frame):
            return self.current
        if cur is not None and cur.frame is not None and cur.frame is not frame \
                and (cur.frame.ids is frame.ids or np.array_equal(cur.frame.ids, frame.ids)):
            # a refreshed frame over the same items (every catalog refresh makes one): the
            # rows are its positions too; pair it, no rebuild (a rebuild assembles 100,000
            # items, seconds of the child's CPU when the pre-assembled values trail the end).
            # Authors changed since the snapshot stay stale rows, rebuilt as before.
            self.current = ItemSnapshot(cur.features, cur.catalog_version, frame)
            return self.current
        # over the frame's items, in its order: a request's candidate positions are rows
        version = self.catalog.version  # before the authors are read: later changes count
        authors, _ = self.catalog.candidate_columns(frame)
        joined = ("author", authors.values(), author_names)
        if self.builder is not None:
            feats = self.builder.build("item", frame.ids, item_names, end, joined=joined)
        else:
            feats = build_snapshot(self.client, "item", frame.ids, item_names, end,
                                   joined=joined)
        old = self.current
        self.current = ItemSnapshot(feats, version, frame)
        self._built_at = time.monotonic()
        if old is not None:  # requests holding the old snapshot may still ask; keep its log
            self.catalog.forget_before(old.catalog_version)
        log.info("feature_snapshot_built", end=end, items=len(feats.ids),
                 columns=len(feats.names), build_s=round(feats.build_s, 3),
                 mb=round(feats.nbytes / 2**20, 2), catalog_version=version)
        return self.current

    def _run(self) -> None:
        failures = 0  # in a row: logged at the first and then every minute, not every tick
        every = max(1, int(60 / max(self.interval_s, 1e-3)))
        while not self._stop.is_set():
            try:
                self.refresh()
                failures = 0
            except (TesseraError, ValueError) as exc:  # keep serving from the store
                if failures % every == 0:
                    log.warning("feature_snapshot_failed", error=str(exc)[:300],
                                failures_in_a_row=failures + 1)
                failures += 1
            except Exception as exc:  # a bug must not kill the thread silently
                log.exception("feature_snapshot_failed", error=str(exc)[:300])
            self._stop.wait(self.interval_s)
