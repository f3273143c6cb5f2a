"""The item catalog serving ranks from: metadata from the ``items`` topic, popularity from
the store's pre-assembled values, and the lists the heuristic generators draw from.

``ItemCatalog`` is filled by ``CatalogFollower`` (a Kafka reader of ``items`` from the
beginning, then tailing) and refreshed every few seconds from the online store (trending by
recent views, fresh by creation time, popular per topic). Readers get an immutable
``CatalogSnapshot``: swapping it is one reference assignment, so requests never see a half
built list.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from itertools import repeat
from typing import Any

import numpy as np

from models.features import CodedColumn, CodeTable
from serving.frame import CandidateFrame, build_frame, carry_over, positions_in
from tessera.logs import get_logger

log = get_logger("serving.catalog")


@dataclass(frozen=True)
class Popularity:
    """Popularity per item as two arrays: ``ids`` sorted (numpy unicode) and ``scores``.

    Arrays, not a dict: a catalog of 100,000 items crosses from the catalog builder's process
    as two buffers, not 100,000 Python objects to unpickle on the serving interpreter.
    """

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))
    scores: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))

    def __len__(self) -> int:
        return len(self.ids)

    def of(self, ids: list[str]) -> np.ndarray:
        """The score of each of ``ids`` (0.0 for an item without one)."""
        out = np.zeros(len(ids), dtype=np.float64)
        at = positions_in(self.ids, ids)
        out[at >= 0] = self.scores[at[at >= 0]]
        return out


@dataclass(frozen=True)
class CatalogSnapshot:
    """Immutable lists of candidate items."""

    trending: tuple[str, ...] = ()
    fresh: tuple[str, ...] = ()
    by_topic: dict[str, tuple[str, ...]] = field(default_factory=dict)
    popularity: Popularity = field(default_factory=Popularity)
    built_at: float = 0.0


class ItemCatalog:
    """Item metadata (author, topic, creation time) and the generator lists."""

    #: the author change log keeps at most this many entries (or one per known item)
    MAX_CHANGES = 10_000

    def __init__(self) -> None:
        self._meta: dict[str, tuple[str, str, int]] = {}
        # the author and the topic of each item again, for lookups of thousands of ids at
        # once through ``map`` (C) on the request path
        self._author: dict[str, str] = {}
        self._topic: dict[str, str] = {}
        self._lock = threading.Lock()
        self.snapshot = CatalogSnapshot()
        #: the published snapshot as columns (``serving.frame``): what requests read
        self.frame = CandidateFrame()
        #: (frame, version, (authors, topics)) of the last ``candidate_columns`` of the
        #: last two frames asked about
        self._columns: tuple[tuple[CandidateFrame, int, tuple[CodedColumn, CodedColumn]], ...] = ()
        #: catalog versions of the previous and the current frame (their patches start there)
        self._frame_versions: tuple[int, ...] = ()
        # items whose author or topic changed (new, re-authored or deleted), in order; entry k is
        # change number ``_changes_base + k + 1``. ``version`` counts all changes so far.
        self._changes: list[str] = []
        self._changes_base = 0

    @property
    def version(self) -> int:
        """Number of author changes recorded so far (0 for an empty catalog)."""
        with self._lock:
            return self._changes_base + len(self._changes)

    def changed_since(self, version: int) -> list[str]:
        """Items whose author or topic changed after ``version`` (all of them if it was
        forgotten)."""
        with self._lock:
            if version < self._changes_base:
                return list(self._meta) + self._changes
            return self._changes[version - self._changes_base:]

    def forget_before(self, version: int) -> None:
        """Drop the change log up to ``version`` (no reader asks about older versions); the
        versions of the current and the previous frame are kept (requests patch from them)."""
        with self._lock:
            version = min(version, *self._frame_versions) if self._frame_versions else version
            k = min(max(0, version - self._changes_base), len(self._changes))
            del self._changes[:k]
            self._changes_base += k

    def upsert(self, item_id: str, author_id: str, topic: str, created_ts: int,
               deleted: bool = False) -> None:
        """Record an item event."""
        with self._lock:
            before = self._meta.get(item_id, ("", ""))[:2]
            if deleted:
                self._meta.pop(item_id, None)
                self._author.pop(item_id, None)
                self._topic.pop(item_id, None)
            else:
                self._meta[item_id] = (author_id, topic, int(created_ts))
                self._author[item_id] = author_id
                self._topic[item_id] = topic
            if (("", "") if deleted else (author_id, topic)) != before:
                self._changes.append(item_id)
                # bounded whether or not a snapshot keeper trims it: a reader older than
                # the dropped part gets every item (``changed_since``), never a wrong answer
                excess = len(self._changes) - max(len(self._meta), self.MAX_CHANGES)
                if excess > 0:
                    del self._changes[:excess]
                    self._changes_base += excess

    def meta(self, item_id: str) -> tuple[str, str, int] | None:
        """(author, topic, created_ts) of an item, or None."""
        return self._meta.get(item_id)

    def authors(self, ids: list[str]) -> list[str]:
        """Author of each id ('' when unknown)."""
        return list(map(self._author.get, ids, repeat("", len(ids))))

    def topics(self, ids: list[str]) -> list[str]:
        """Topic of each id ('' when unknown)."""
        return list(map(self._topic.get, ids, repeat("", len(ids))))

    def __len__(self) -> int:
        return len(self._meta)

    def known_ids(self) -> list[str]:
        """The items the ``items`` topic announced (and did not delete)."""
        with self._lock:
            return list(self._meta)

    def item_ids(self) -> list[str]:
        """Every item the catalog knows: from the ``items`` topic or with popularity."""
        return list(dict.fromkeys([*self.known_ids(), *self.snapshot.popularity.ids.tolist()]))

    def rebuild(self, popularity: dict[str, float], *, top: int = 2_000,
                per_topic: int = 1_000) -> CatalogSnapshot:
        """Recompute the lists from ``popularity`` (item -> score) and swap them in.

        The ranking and the per-topic lists are numpy passes; only gathering the inputs
        (popularity, topic, creation time per item) walks the items in Python. Ties rank by
        item id, the same in every serving process.
        """
        with self._lock:
            meta = dict(self._meta)
        ids = np.array(sorted(meta.keys() | popularity.keys()), dtype=object)
        n = len(ids)
        get_pop = popularity.get
        pop = np.fromiter((get_pop(i, 0.0) for i in ids), dtype=np.float64, count=n)
        none = ("", "", 0)
        rows = [meta.get(i, none) for i in ids]
        topics = np.array([r[1] for r in rows], dtype=object)
        created = np.fromiter((r[2] for r in rows), dtype=np.int64, count=n)
        order = np.argsort(-pop, kind="stable")  # ids are sorted: ties by id
        trending = tuple(ids[order[:top]][pop[order[:top]] > 0].tolist())
        fresh = tuple(ids[np.argsort(-created, kind="stable")[:top]].tolist())
        # each topic's items in popularity order, at most per_topic of them
        t_sorted = topics[order]
        named = np.flatnonzero(t_sorted != "")
        by_topic: dict[str, tuple[str, ...]] = {}
        if len(named):
            names, codes = np.unique(t_sorted[named].astype(str), return_inverse=True)
            grouped = np.argsort(codes, kind="stable")  # by topic, popularity order kept
            starts = np.searchsorted(codes[grouped], np.arange(len(names)))
            ends = np.append(starts[1:], len(grouped))
            item_of = ids[order[named[grouped]]]
            by_topic = {str(t): tuple(item_of[a:min(b, a + per_topic)].tolist())
                        for t, a, b in zip(names.tolist(), starts.tolist(), ends.tolist())}
        snap = CatalogSnapshot(trending, fresh, by_topic,
                               Popularity(ids.astype(str) if n else Popularity().ids, pop),
                               time.time())
        self.snapshot = snap
        return snap

    def publish(self, snap: CatalogSnapshot, frame: CandidateFrame | None = None) -> None:
        """Swap in lists and their frame (``serving.frame``).

        ``frame`` comes built with the lists (the catalog builder's child process makes
        it, so the serving interpreter never walks the whole catalog); its
        ``catalog_version`` must be this catalog's version from before the lists were
        asked for (later changes are patched in by ``candidate_columns``). Without one, the
        frame is built here (small catalogs: tests, no Kafka).
        """
        if frame is None:
            ids = snap.popularity.ids
            version = self.version  # before the metadata is read: later changes get patched
            id_list = ids.tolist()
            frame = build_frame(ids, self.authors(id_list), self.topics(id_list),
                                trending=snap.trending, fresh=snap.fresh,
                                by_topic=snap.by_topic, catalog_version=version)
        frame = carry_over(self.frame, frame)
        with self._lock:
            self._frame_versions = (*self._frame_versions[-1:], frame.catalog_version)
        self.snapshot = snap
        self.frame = frame

    def candidate_columns(self, frame: CandidateFrame) -> tuple[CodedColumn, CodedColumn]:
        """Author and topic of every position of ``frame``, as the catalog has them now.

        The frame's own columns, with the items changed since it was built patched in
        (a copy, made once per catalog version and frame, not per request).
        """
        version = self.version
        for cached in self._columns:
            if cached[0] is frame and cached[1] == version:
                return cached[2]
        authors, topics = frame.authors, frame.topics
        changed = self.changed_since(frame.catalog_version) \
            if version != frame.catalog_version else []
        if changed:
            pos = frame.positions(changed)
            hit = pos >= 0
            if hit.any():
                ids = [changed[k] for k in np.flatnonzero(hit).tolist()]
                authors = _patched(authors, pos[hit], self.authors(ids))
                topics = _patched(topics, pos[hit], self.topics(ids))
        columns = (authors, topics)
        # the last two frames: requests on the published one while a snapshot is built
        # over the next one (the keeper asks for the next one's) do not evict each other
        self._columns = (*[c for c in self._columns if c[0] is not frame][-1:],
                         (frame, version, columns))
        return columns


def _patched(col: CodedColumn, rows: np.ndarray, values: list[str]) -> CodedColumn:
    """``col`` with ``values`` at ``rows`` (a new column; new values extend a new table)."""
    table = col.table
    new = table.codes_of(values)
    if (new < 0).any():
        extra = list(dict.fromkeys(v for v, c in zip(values, new.tolist()) if c < 0))
        table = CodeTable(np.concatenate([table.values, np.array(extra, dtype=str)]))
        new = table.codes_of(values)
    codes = col.codes.copy()
    codes[rows] = new
    return CodedColumn(codes, table)


class CatalogFollower:
    """Read the ``items`` topic from the beginning and keep following it."""

    def __init__(self, bootstrap: str, catalog: ItemCatalog, topic: str = "items"):
        self.bootstrap = bootstrap
        self.catalog = catalog
        self.topic = topic
        self._stop = threading.Event()
        self.caught_up = threading.Event()
        self._thread = threading.Thread(target=self._run, name="catalog-follower", daemon=True)

    def start(self) -> CatalogFollower:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        """Follow the topic; when the brokers go away, drop the consumer and start over.

        A consumer kept assigned across a broker restart crashed librdkafka here (a segfault
        in its main thread when the embedded broker came back with recreated topics), so the
        follower closes its consumer on the first transport error and reads the topic from
        the beginning once a metadata request succeeds again (item events are upserts, so
        reading them twice is harmless).
        """
        while not self._stop.is_set():
            try:
                self._follow_once()
            except Exception as exc:  # never let the follower thread die
                log.warning("catalog_follower_error", error=str(exc)[:200])
            if not self._stop.is_set():
                self._stop.wait(1.0)

    def _follow_once(self) -> None:
        from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

        from schemas.columnar import decode_message
        from tessera.topics import consumer_config, list_topics

        parts = list_topics(self.bootstrap).get(self.topic, 0)
        broken = threading.Event()

        def on_error(err) -> None:
            if err.code() in (KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN,
                              KafkaError._RESOLVE):
                broken.set()

        consumer = Consumer(consumer_config(self.bootstrap, partition_eof=True,
                                            error_cb=on_error))
        consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in range(parts)])
        at_end: set[int] = set()
        try:
            while not self._stop.is_set() and not broken.is_set():
                msgs = consumer.consume(1000, timeout=0.5)
                for m in msgs:
                    err = m.error()
                    if err is not None:
                        if err.code() == KafkaError._PARTITION_EOF:
                            at_end.add(m.partition())
                            if len(at_end) >= parts:
                                self.caught_up.set()
                        continue
                    try:
                        cols = decode_message(m.value(), self.topic)
                    except Exception:
                        continue  # malformed item events are the blocks flow's DLQ business
                    c = cols.columns
                    ids = c["item_id"].values()
                    authors = c["author_id"].values()
                    topics = c["topic"].values()
                    ops = c["op"].values()
                    for i, a, t, ts, op in zip(ids, authors, topics, c["created_ts"].tolist(), ops):
                        self.catalog.upsert(i, a, t, ts, deleted=(op == "deleted"))
                if not msgs and parts == 0:
                    self.caught_up.set()
            if broken.is_set():
                log.warning("catalog_follower_reconnect", reason="brokers unreachable")
        finally:
            consumer.close()


def popularity_from_store(store: Any, ids: list[str], feature: str = "item_views_1d",
                          table: str = "hot", chunk: int = 5_000,
                          pause_s: float = 0.002) -> dict[str, float]:
    """Read one pre-assembled value per item (missing: 0), in chunks.

    Between chunks the thread sleeps ``pause_s``, so a refresh over a large catalog on a
    serving thread never holds the interpreter for long against the request threads.
    """
    out: dict[str, float] = {}
    for lo in range(0, len(ids), chunk):
        part = ids[lo:lo + chunk]
        res = store.get_values("item", table, part)
        if feature not in res.columns:
            return {}
        col = res.matrix[:, res.columns.index(feature)]
        out.update((i, float(v)) for i, v in zip(part, col.tolist()) if v == v)
        if pause_s:
            time.sleep(pause_s)
    return out


def refresh_lists(catalog: ItemCatalog, store: Any, *, pause_s: float = 0.002,
                  chunk: int = 5_000) -> CatalogSnapshot:
    """Rebuild ``catalog``'s lists from the store: every item it knows or the store has
    blocks of, ranked by its pre-assembled ``item_views_1d``.

    The store is listed and read ``chunk`` items at a time with a ``pause_s`` sleep between
    chunks, so the work never takes a core for long in one piece.
    """
    listed: list[str] = []
    for n, item_id in enumerate(store.list_entity_ids("item", "views"), 1):
        listed.append(item_id)
        if pause_s and n % chunk == 0:
            time.sleep(pause_s)
    ids = list(dict.fromkeys([*catalog.known_ids(), *listed]))
    return catalog.rebuild(popularity_from_store(store, ids, chunk=chunk, pause_s=pause_s))
