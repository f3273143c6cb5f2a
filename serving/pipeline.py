"""The feed request life cycle: candidates -> hydrate -> L1 -> L2 -> rules -> forward log.

``FeedPipeline.feed`` is synchronous (numpy, LMDB and ONNX Runtime release the GIL where it
matters); the HTTP layer runs it in a worker thread. Every stage is timed into the stage
histogram, and each stage's candidate survival is recorded.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from cachetools import TTLCache

from features.client import FeatureClient, FeatureVectors, HistoricalReadError
from features.errors import TesseraError
from features.fingerprint import fingerprint_name, list_fingerprint
from features.spec import DEFAULT_BLOCK_SIZES
from features.store.base import NO_WATERMARK
from models.features import CodedColumn
from schemas.columnar import MapMatrix, columns_of
from schemas.errors import EncodeError
from serving.catalog import ItemCatalog
from serving.config import ServingConfig
from serving.forward_log import ImpressionLogger
from serving.frame import SOURCE_CODE, SOURCES, CandidateFrame
from serving.metrics import ServingMetrics
from serving.ranking import ModelBundle
from serving.requests import FeedRequest
from tessera.logs import get_logger

if TYPE_CHECKING:
    from serving.snapshots import SnapshotKeeper
    from serving.tracking import CtrTracker, DriftTracker

log = get_logger("serving.pipeline")

CANDIDATE_CACHE_ENTRIES = 100_000
#: how much older than the newest trusted end a request may read at, to stay on the feature
#: snapshot while the next one is built: one streaming block
SNAPSHOT_LAG_MS = DEFAULT_BLOCK_SIZES[0]
"""Users (x feed types) whose merged candidates are cached; the least recently used go."""


@dataclass
class FeedResult:
    """What ``feed`` returns (the HTTP layer turns it into JSON)."""

    request_id: str
    items: list[dict]
    model_versions: dict[str, str]
    feature_watermark: int
    degraded: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Candidates:
    """Merged candidates of one request: positions in ``frame`` and each one's source code
    (``serving.frame.SOURCES``), in generator order, each item once."""

    frame: CandidateFrame
    pos: np.ndarray
    source: np.ndarray

    def __len__(self) -> int:
        return len(self.pos)

    def without(self, ids: list[str]) -> Candidates:
        """These candidates less ``ids`` (what the user just saw)."""
        if not ids or not len(self.pos):
            return self
        seen = self.frame.positions(ids)
        mark = np.zeros(len(self.frame), dtype=bool)
        mark[seen[seen >= 0]] = True
        keep = ~mark[self.pos]
        return Candidates(self.frame, self.pos[keep], self.source[keep])

    def ids(self) -> list[str]:
        """The candidates' item ids."""
        return self.frame.ids_at(self.pos)


def impression_ids(n: int) -> list[str]:
    """``n`` new impression ids (``imp-`` and 32 random hex digits) from one ``urandom``."""
    raw = os.urandom(16 * n).hex()
    return [f"imp-{raw[32 * i:32 * i + 32]}" for i in range(n)]


class FeedPipeline:
    """Everything a feed request needs, shared by the request threads."""

    def __init__(self, config: ServingConfig, client: FeatureClient, catalog: ItemCatalog,
                 logger: ImpressionLogger, metrics: ServingMetrics, *,
                 ctr: CtrTracker | None = None, drift: DriftTracker | None = None,
                 snapshots: SnapshotKeeper | None = None):
        self.config = config
        self.client = client
        self.catalog = catalog
        self.logger = logger
        self.metrics = metrics
        self.models = ModelBundle()
        self.ctr = ctr  # the dashboard's CTR per model version
        self.drift = drift  # served feature distributions
        self.snapshots = snapshots  # item + author features at the current end, in memory
        # per (user, feed type): the merged candidates, for candidate_cache_ttl_ms
        self._candidate_cache: TTLCache[tuple[str, str], Candidates] = TTLCache(
            maxsize=CANDIDATE_CACHE_ENTRIES, ttl=config.candidate_cache_ttl_ms / 1000)
        self._candidate_lock = threading.Lock()  # TTLCache is not thread-safe

    # ------------------------------------------------------------------ stages
    @contextmanager
    def _stage(self, name: str, timings: dict[str, float]):
        t = time.perf_counter()
        try:
            yield
        finally:
            dt = time.perf_counter() - t
            timings[name] = dt * 1000
            self.metrics.stage_seconds.labels(stage=name).observe(dt)

    def _sequence(self, user_id: str, degraded: list[str]):
        try:
            seq = self.client.get_sequences([user_id], max_len=50)
            n = int(seq.lengths[0])
            return list(seq.item_ids[0, :n]), list(seq.actions[0, :n])
        except TesseraError:
            degraded.append("sequences_unavailable")
            return [], []

    def candidates(self, req: FeedRequest, seq_items: list[str], models: ModelBundle,
                   user_row: dict | None = None) -> Candidates:
        """Fan out to the generators; merge and dedupe keeping each item's first source.

        Each generator offers at most its limit (an item another one offered first counts
        against it too); items the catalog's frame lacks are left out (no metadata to rank
        them with).
        """
        frame = self.frame()
        key = (req.user_id, req.feed_type)
        with self._candidate_lock:
            hit = self._candidate_cache.get(key)
        if hit is not None and hit.frame is frame:
            self.metrics.cache.labels(cache="candidates", result="hit").inc()
            return hit
        self.metrics.cache.labels(cache="candidates", result="miss").inc()
        limits = self.config.candidate_limits
        parts: list[np.ndarray] = []
        sources: list[int] = []

        def add(pos: np.ndarray, source: str, limit: int) -> None:
            parts.append(pos[:limit])
            sources.append(SOURCE_CODE[source])

        if models.retrieval is not None and seq_items is not None:
            limit = limits.get("ann", 1000)
            try:
                found = frame.positions(models.retrieval.search(seq_items, limit, user_row)[:limit])
                add(found[found >= 0], "ann", limit)
            except Exception as exc:  # a broken index must not fail the request
                log.warning("ann_failed", error=str(exc)[:200])
        topics = Counter(t for t in self.catalog.topics(seq_items) if t)
        if topics:
            per = max(1, limits.get("topics", 500) // max(1, min(3, len(topics))))
            for topic, _ in topics.most_common(3):
                add(frame.by_topic.get(topic, frame.fresh[:0]), "topics", per)
        if req.feed_type == "FOLLOW":
            authors, _ = self.catalog.candidate_columns(frame)
            followed = authors.table.codes_of([a for a in self.catalog.authors(seq_items) if a])
            trending = frame.trending
            add(trending[np.isin(authors.codes[trending], followed[followed >= 0])], "follow",
                limits.get("topics", 500))
        add(frame.trending, "trending", limits.get("trending", 500))
        add(frame.fresh, "fresh", limits.get("fresh", 300))
        pos = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        source = np.repeat(np.array(sources, dtype=np.int8), [len(p) for p in parts])
        _, first = np.unique(pos, return_index=True)
        first.sort()
        result = Candidates(frame, pos[first], source[first])
        with self._candidate_lock:
            self._candidate_cache[key] = result
        return result

    def frame(self) -> CandidateFrame:
        """The catalog frame requests take candidates from: the feature snapshot's while
        there is one (its rows are the frame's positions), else the catalog's newest."""
        cur = self.snapshots.current if self.snapshots is not None else None
        if cur is not None and cur.frame is not None:
            return cur.frame
        return self.catalog.frame

    # ------------------------------------------------------------------ request
    def _read(self, entity_type: str, ids: list[str], names: Any, end: int,
              splits: set[str]) -> FeatureVectors:
        """Read at the request's snapshot end; a family too far ahead of it reads at its own.

        A family more than ``READ_LAG_MS`` ahead of the others (one topic idle for long,
        say) may have dropped blocks the common end needs, so the client refuses that read;
        the request is then served with that family at its own end (counted and logged), not
        failed, and ``entity_type`` joins ``splits``: its values are not logged with the
        request's end, which they do not belong to.
        """
        try:
            return self.client.get_features(entity_type, ids, list(names), end=end)
        except HistoricalReadError as exc:
            self.metrics.degraded.labels(reason="snapshot_split").inc()
            log.warning("snapshot_split", entity_type=entity_type, end=end, error=str(exc)[:200])
            splits.add(entity_type)
            return self.client.get_features(entity_type, ids, list(names))

    def _request_end(self, newest: int, names: tuple[str, ...]) -> int:
        """The window end this request reads everything at: ``newest`` (the latest every
        family trusts), or the feature snapshot's end while the snapshot for ``newest`` is
        being built and it is at most ``SNAPSHOT_LAG_MS`` older.

        Any trusted end gives one consistent snapshot, logged and recomputed by the backfill
        the same way; an older one by at most a block is only that much less fresh. It keeps
        hydration a gather during a rebuild (which took up to 8 s on 2 busy cores), where
        every request would otherwise read ~2,000 candidates from the store.
        """
        if self.snapshots is None or newest == NO_WATERMARK:
            return newest
        cur = self.snapshots.current
        if cur is None or cur.features.names != names:
            return newest
        held = cur.features.end
        return held if held < newest <= held + SNAPSHOT_LAG_MS else newest

    def _hydrate_items(self, cands: Candidates, item_names: tuple[str, ...],
                       author_names: tuple[str, ...], end: int,
                       splits: set[str] | None = None) -> dict[str, np.ndarray]:
        """Item and author feature columns of the candidates at ``end`` (one per name).

        From the process's feature snapshot when it is at ``end`` (a gather; the items it
        lacks are read from the store at the same end), else from the store.
        """
        names = item_names + author_names
        snap = self.snapshots.matching(end, names) if self.snapshots is not None else None
        if snap is None:
            if self.snapshots is not None:
                self.metrics.cache.labels(cache="snapshot", result="miss").inc()
            return self._read_items(cands.ids(), item_names, author_names, end, splits)
        self.metrics.cache.labels(cache="snapshot", result="hit").inc()
        rows = self.snapshots.rows_at(snap, cands.frame, cands.pos)
        feats = snap.features
        absent = np.flatnonzero(rows < 0)
        if not len(absent):
            cols = feats.columns(rows)
        else:  # items newer than the snapshot, or re-authored: the store, at the same end
            values = feats.values[np.where(rows < 0, 0, rows)]
            rest = self._read_items(cands.frame.ids_at(cands.pos[absent]), item_names,
                                    author_names, end, splits)
            for j, n in enumerate(feats.names):
                values[absent, j] = rest[n]
            cols = {n: values[:, j] for j, n in enumerate(feats.names)}
        self.metrics.feature_lag.set(max(0, int(time.time() * 1000) - end) / 1000)
        return cols

    def _read_items(self, ids: list[str], item_names: tuple[str, ...],
                    author_names: tuple[str, ...], end: int,
                    splits: set[str] | None = None) -> dict[str, np.ndarray]:
        splits = set() if splits is None else splits
        items_fv = self._read("item", ids, item_names, end, splits)
        item_cols = {n: items_fv.values[:, j] for j, n in enumerate(items_fv.names)}
        if author_names and ids:  # each author read once, broadcast to its items
            afv = self._read("author", self.catalog.authors(ids), author_names, end, splits)
            item_cols.update({n: afv.values[:, j] for j, n in enumerate(afv.names)})
        self.metrics.feature_lag.set(max(0, items_fv.lag_ms) / 1000)
        return item_cols

    def _hydrate_user(self, req: FeedRequest, models: ModelBundle, degraded: list[str],
                      splits: set[str]) -> tuple[int, dict[str, Any]]:
        """The request's one window end and the user's values at it.

        One end for every read of the request (user, item and author families alike):
        what is served and logged is one snapshot, the values the backfill recomputes at
        the logged watermark. A store failure degrades the request (no user values).
        """
        item_names = models.item_feature_names()
        author_names = models.author_feature_names()
        user_names = models.user_feature_names()
        watermark = 0
        try:
            watermark = self._request_end(
                self.client.snapshot_end([("user", user_names), ("item", item_names),
                                          ("author", author_names)]),
                item_names + author_names)
            user_row: dict[str, Any] = {}
            if user_names:
                user_row = self._read("user", [req.user_id], user_names, watermark,
                                      splits).row(0)
            return watermark, user_row
        except TesseraError as exc:
            degraded.append("store_unavailable")
            log.warning("hydrate_user_failed", error=str(exc)[:200])
            return watermark, {}

    def _hydrate(self, cands: Candidates, models: ModelBundle, watermark: int,
                 degraded: list[str], splits: set[str]) -> dict[str, np.ndarray] | None:
        """Item and author columns of the candidates at ``watermark``; None when the store
        failed (the request is then ranked by popularity from the catalog)."""
        try:
            if "store_unavailable" in degraded:
                raise TesseraError("the store failed for the user read")
            return self._hydrate_items(cands, models.item_feature_names(),
                                       models.author_feature_names(), watermark, splits)
        except TesseraError as exc:
            if "store_unavailable" not in degraded:
                degraded.append("store_unavailable")
            self.metrics.degraded.labels(reason="store_unavailable").inc()
            log.warning("hydrate_failed", error=str(exc)[:200])
            return None

    def _rank(self, models: ModelBundle, item_cols: dict[str, np.ndarray],
              user_row: dict[str, Any], context: dict[str, Any], degraded: list[str],
              timings: dict[str, float]) -> tuple[np.ndarray, ...]:
        """L1 over every candidate, L2 over L1's best ``l1_keep`` (the popularity ranker for
        a stage without a model or a degraded request).

        Returns ``(scores_l1, keep, scores_l2, order)``: ``keep`` the candidates L1 kept,
        ``scores_l2`` theirs in that order, ``order`` the kept ones best first.
        """
        n_cands = len(context["item_id"])
        scores_l1 = np.zeros(n_cands)
        with self._stage("l1", timings):
            ranker = models.l1 if models.l1 is not None and not degraded else models.fallback
            if n_cands:
                scores_l1 = ranker.score(item_cols, user=user_row, context=context)
            keep = np.argsort(-scores_l1, kind="stable")[: self.config.l1_keep]
        self.metrics.candidates.labels(stage="l1").observe(len(keep))
        sub_cols = {n: c[keep] for n, c in item_cols.items()}
        sub_ctx = {**context, **{name: context[name].take(keep)
                                 for name in ("item_id", "author_id", "topic", "user_id")}}
        with self._stage("l2", timings):
            ranker2 = models.l2 if models.l2 is not None and not degraded else models.fallback
            scores_l2 = (ranker2.score(sub_cols, user=user_row, context=sub_ctx)
                         if len(keep) else np.zeros(0))
            order = keep[np.argsort(-scores_l2, kind="stable")]
        return scores_l1, keep, scores_l2, order

    def _author_capped(self, order: np.ndarray, authors: CodedColumn, limit: int) -> list[int]:
        """The first ``limit`` of ``order`` (candidate indexes, best first) with at most
        ``author_cap`` items per author (the code of '' is no author: never capped)."""
        per_author: Counter = Counter()
        page: list[int] = []
        no_author = int(authors.table.codes_of([""])[0])
        for idx, code in zip(order.tolist(), authors.codes[order].tolist()):
            if code != no_author and per_author[code] >= self.config.author_cap:
                continue
            per_author[code] += 1
            page.append(idx)
            if len(page) >= limit:
                break
        return page

    def feed(self, req: FeedRequest, *, ranker: str | None = None) -> FeedResult:
        """Serve one feed page (see the module docstring).

        Args:
            ranker: ``"popularity"`` ranks with the baseline (experiments, the simulator's
                control arm); None uses the loaded models.
        """
        timings: dict[str, float] = {}
        degraded: list[str] = []
        models = self.models  # one consistent bundle for the whole request
        if ranker == "popularity":
            models = ModelBundle(retrieval=models.retrieval)
        request_id = f"r-{uuid.uuid4().hex}"
        with self._stage("sequence", timings):
            seq_items, _ = self._sequence(req.user_id, degraded)
        splits: set[str] = set()  # families read at their own end, not the request's
        with self._stage("hydrate_user", timings):
            watermark, user_row = self._hydrate_user(req, models, degraded, splits)
        with self._stage("candidates", timings):
            cands = self.candidates(req, seq_items, models, user_row)
            cands = cands.without(seq_items)  # what the user just saw is not offered again
            frame = cands.frame
            authors_all, topics_all = self.catalog.candidate_columns(frame)
            item_col = CodedColumn(cands.pos, frame.items)
            author_col = authors_all.take(cands.pos)
            topic_col = topics_all.take(cands.pos)
        n_cands = len(cands)
        self.metrics.candidates.labels(stage="retrieved").observe(n_cands)
        with self._stage("hydrate", timings):
            item_cols = self._hydrate(cands, models, watermark, degraded, splits)
            if item_cols is None:
                item_cols = {"item_views_1d": self.catalog.snapshot.popularity.of(cands.ids()),
                             "item_ctr_1d": np.full(n_cands, 0.01)}
                user_row = {}
        context = {"item_id": item_col, "author_id": author_col, "topic": topic_col,
                   "user_id": CodedColumn.repeat(req.user_id, n_cands), "sequence": seq_items}
        scores_l1, keep, scores_l2, order = self._rank(models, item_cols, user_row, context,
                                                       degraded, timings)
        with self._stage("rules", timings):
            page = self._author_capped(order, author_col, req.limit)
        n0 = max(1, n_cands)
        self.metrics.survival.labels(stage="l1").set(len(keep) / n0)
        self.metrics.survival.labels(stage="page").set(len(page) / n0)
        rank_in_keep = np.empty(n_cands, dtype=np.intp)
        rank_in_keep[keep] = np.arange(len(keep))
        page_idx = np.asarray(page, dtype=np.intp)
        shown = _Page(request_id, req, cands, page_idx, author_col.take(page_idx),
                      topic_col.take(page_idx), scores_l1[page_idx],
                      scores_l2[rank_in_keep[page_idx]] if len(page_idx) else np.zeros(0),
                      models.versions, int(time.time() * 1000), int(watermark))
        items = shown.items()
        with self._stage("log", timings):
            self._log_page(shown, item_cols, user_row, splits, models, degraded)
        return FeedResult(request_id, items, shown.versions, int(watermark), degraded, timings)

    def _log_page(self, shown: _Page, item_cols: dict[str, np.ndarray],
                  user_row: dict[str, Any], splits: set[str], models: ModelBundle,
                  degraded: list[str]) -> None:
        """Hand the page's impressions (with every logged feature value) to the forward
        log, and feed the dashboard's CTR and drift trackers."""
        # what is logged is what belongs to the logged end: not a split family's values
        unlogged = (set(models.item_feature_names()) if "item" in splits else set()) | \
            (set(models.author_feature_names()) if "author" in splits else set())
        logged_names = [n for n in item_cols if n not in unlogged]
        # the user's values, once per request: numbers as they are, lists by fingerprint
        user_logged = {} if "user" in splits else {
            f"user:{k}": float(v) for k, v in user_row.items() if isinstance(v, float) and v == v}
        if "user" not in splits:
            user_logged.update({f"user:{fingerprint_name(k)}": list_fingerprint(v)
                                for k, v in user_row.items()
                                if v is None or isinstance(v, list)})
        page_idx, n_page = shown.idx, len(shown.idx)
        # the logged rows as columns: one matrix of the page's item values (NaN: not
        # logged) beside the user's values, which every row shares
        item_vals = (np.column_stack([np.asarray(item_cols[n], dtype=np.float64)[page_idx]
                                      for n in logged_names])
                     if logged_names else np.zeros((n_page, 0)))
        user_vals = np.array(list(user_logged.values()), dtype=np.float64)
        features = MapMatrix(
            tuple(logged_names) + tuple(user_logged),
            np.hstack([item_vals, np.broadcast_to(user_vals, (n_page, len(user_vals)))]),
            np.hstack([item_vals == item_vals, np.ones((n_page, len(user_vals)), bool)]))
        try:
            impressions = columns_of("impressions", n_page, {
                "impression_id": shown.imp_ids, "event_id": shown.imp_ids,
                "event_ts": shown.now, "request_id": shown.request_id,
                "user_id": shown.req.user_id, "item_id": shown.ids,
                "author_id": shown.authors, "topic": shown.topics,
                "position": np.arange(n_page, dtype=np.int64),
                "feed_type": shown.req.feed_type, "source": shown.sources,
                "model_versions": shown.versions,
                "scores": MapMatrix(("l1", "l2"), np.column_stack([shown.l1, shown.l2]),
                                    np.ones((n_page, 2), bool)),
                "features": features, "feature_watermark": shown.watermark,
            })
        except EncodeError as exc:  # a value the schema refuses: the page is still served
            log.error("impressions_not_logged", request_id=shown.request_id,
                      error=str(exc)[:300])
            impressions = None
        if impressions is not None:
            self.logger.log(impressions)
        if self.ctr is not None:
            from serving.tracking import version_label

            self.ctr.record_impressions(version_label(shown.versions), shown.imp_ids, shown.now)
        if self.drift is not None and n_page and not degraded:
            for n in item_cols:
                self.drift.observe(n, item_cols[n][page_idx])


class _Page:
    """The items one request shows, as columns (indexes into its candidates)."""

    def __init__(self, request_id: str, req: FeedRequest, cands: Candidates, idx: np.ndarray,
                 authors: CodedColumn, topics: CodedColumn, l1: np.ndarray, l2: np.ndarray,
                 versions: dict[str, str], now: int, watermark: int):
        self.request_id, self.req, self.idx = request_id, req, idx
        self.ids = cands.frame.ids_at(cands.pos[idx])
        self.authors = authors.values().tolist()
        self.topics = topics.values().tolist()
        self.sources = [SOURCES[c] for c in cands.source[idx].tolist()]
        self.l1, self.l2 = l1, l2
        self.versions, self.now, self.watermark = versions, now, watermark
        self.imp_ids = impression_ids(len(idx))

    def items(self) -> list[dict]:
        """The page as the response lists it."""
        return [{"item_id": item_id, "author_id": author, "score": score, "source": source,
                 "position": pos, "impression_id": imp_id}
                for pos, (item_id, author, source, score, imp_id) in enumerate(zip(
                    self.ids, self.authors, self.sources, self.l2.tolist(), self.imp_ids))]
