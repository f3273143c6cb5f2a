"""The request-time feature read: dense matrices of window and derived features.

``FeatureClient.get_features(entity_type, ids, names, at=t)`` returns one float32 row per id
(in the order of ``ids``; repeated ids are read once and broadcast) and one column per name,
with the feature watermark every value was computed at, which values were missing (their
default was used), and which features are stale beyond their freshness budget.

Where values come from, per request:

1. the in-process cache (exact: keyed by the window end, see ``features.tiling``);
2. pre-assembled values (``put_values`` rows written by ``refresh_preassembled``) when the
   table holds every requested window value and its watermark is within the features'
   freshness budget;
3. blocks, assembled with the same tiling function the offline backfill uses.

All values of one request share one window end ``min(wm, align_down(t, b))``, with ``wm`` the
lowest trusted watermark among the feature families read (and the pre-assembled table's,
when it is used). That single watermark is what serving logs with the impression.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from features import replaymarks
from features.aggregations import Aggregation, build_aggregation
from features.assembly import BlockIndex, select_cover_rows
from features.cache import FeatureCache
from features.errors import TesseraError
from features.expressions import CompiledExpr, parse_derived
from features.pointintime import _finalize_fixed
from features.spec import DerivedFeatureSpec, FeatureSet, FeatureSpec
from features.store.base import NO_WATERMARK, OnlineStore
from features.tiling import READ_LAG_MS, cover_window, window_bounds
from features.timeutil import align_down, to_iso

PREASSEMBLED_TABLE = "hot"


def _shown(wm: int, finest: int) -> str:
    """A watermark as every command shows it: the aligned end of the last complete block."""
    end = align_down(wm, finest)
    return f"{end} ({to_iso(end)})"


class HistoricalReadError(TesseraError, ValueError):
    """A read asked for a time well before the store's watermark (history is offline's job)."""


class UnknownFeatureError(TesseraError, KeyError):
    """A requested feature name is not defined (or belongs to another entity type)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


@dataclass(frozen=True)
class FeatureRef:
    """A requested feature name resolved against the definitions."""

    name: str
    kind: Literal["window", "derived"]
    spec: FeatureSpec | None = None
    window: int | None = None
    derived: DerivedFeatureSpec | None = None

    @property
    def numeric(self) -> bool:
        """Whether the value is a number (``last_n`` values are lists)."""
        return self.kind == "derived" or (self.spec is not None and self.spec.aggregation != "last_n")


@dataclass
class FeatureVectors:
    """The result of one ``get_features`` call.

    Attributes:
        values: float32 [len(ids), len(names)]; lists (``last_n``) are in ``lists`` and NaN here.
        missing: bool, same shape: no data for the entity, so the feature default was used.
        watermark: the feature watermark of every value (epoch ms); log it with impressions.
        stale: names whose watermark lags ``at`` by more than their freshness budget, or
            that a replay is still computing (``features.replaymarks``).
        lag_ms: ``align_down(at, b) - watermark``.
        sources: how many rows came from the cache, pre-assembled values and blocks.
        lists: name -> one list per id, for ``last_n`` features.
    """

    entity_type: str
    ids: list[str]
    names: list[str]
    values: np.ndarray
    missing: np.ndarray
    watermark: int
    at: int
    stale: tuple[str, ...]
    lag_ms: int
    sources: dict[str, int] = field(default_factory=dict)
    lists: dict[str, list[list[Any]]] = field(default_factory=dict)

    def row(self, i: int) -> dict[str, Any]:
        """Row ``i`` as ``{name: value}`` (lists for ``last_n``)."""
        out: dict[str, Any] = {}
        for j, name in enumerate(self.names):
            out[name] = self.lists[name][i] if name in self.lists else float(self.values[i, j])
        return out


@dataclass
class SequenceBatch:
    """Recent actions of many users as padded arrays (most recent first)."""

    ids: list[str]
    item_ids: np.ndarray  # object [n, L], "" padding
    actions: np.ndarray  # object [n, L], "" padding
    ts: np.ndarray  # int64 [n, L], 0 padding
    dwell_ms: np.ndarray  # int64 [n, L]
    lengths: np.ndarray  # int32 [n]


def _now_ms() -> int:
    return int(time.time() * 1000)


class FeatureClient:
    """Read feature vectors for many entities at once from an ``OnlineStore``.

    Args:
        store: the online store (read-only is enough).
        features: the feature definitions the blocks were written with.
        cache: optional in-process cache (``FeatureCache``).
        clock: returns now in epoch ms (tests pass a fixed clock).
        preassembled_table: name of the pre-assembled values table.
        watermark_ttl_ms: how long watermarks read from the store are reused (0: read them
            on every call). Serving reuses them for a few milliseconds: at 100 requests/s,
            reading them on every request was about a sixth of a request's CPU, and a
            request end only moves at block boundaries anyway.
    """

    def __init__(
        self,
        store: OnlineStore,
        features: FeatureSet,
        *,
        cache: FeatureCache | None = None,
        clock: Callable[[], int] = _now_ms,
        preassembled_table: str = PREASSEMBLED_TABLE,
        watermark_ttl_ms: int = 0,
    ) -> None:
        if watermark_ttl_ms < 0:
            raise ValueError(f"watermark_ttl_ms must be >= 0, got {watermark_ttl_ms}")
        self.store = store
        self.watermark_ttl_ms = watermark_ttl_ms
        #: prefix -> (expiry by ``clock``, watermarks) when ``watermark_ttl_ms`` > 0
        self._marks: dict[str, tuple[float, dict[str, int]]] = {}
        self.features = features
        self.cache = cache
        self.clock = clock
        self.table = preassembled_table
        self._refs: dict[str, FeatureRef] = {}
        for spec in features.features:
            for w in spec.windows:
                self._refs[spec.window_name(w)] = FeatureRef(spec.window_name(w), "window",
                                                             spec=spec, window=w)
        self._derived: dict[str, CompiledExpr] = {}
        for d in features.derived:
            self._refs[d.name] = FeatureRef(d.name, "derived", derived=d)
            self._derived[d.name] = parse_derived(d.expression)
        self._aggs: dict[str, Aggregation] = {f.key: build_aggregation(f) for f in features.features}

    # ------------------------------------------------------------------ names
    def entity_types(self) -> list[str]:
        """The entity types the feature definitions read, sorted."""
        return sorted({self._entity_type(r) for r in self._refs.values()})

    def names_for(self, entity_type: str) -> list[str]:
        """Every feature name readable for ``entity_type``."""
        return [n for n, r in self._refs.items() if self._entity_type(r) == entity_type]

    @staticmethod
    def _entity_type(ref: FeatureRef) -> str:
        return ref.spec.entity_type if ref.spec is not None else ref.derived.entity_type

    def resolve(self, entity_type: str, names: Sequence[str]) -> list[FeatureRef]:
        """Resolve names; raise ``UnknownFeatureError`` naming the bad ones and the valid ones."""
        refs, bad = [], []
        for n in names:
            ref = self._refs.get(n)
            if ref is None or self._entity_type(ref) != entity_type:
                bad.append(n)
            else:
                refs.append(ref)
        if bad:
            known = ", ".join(sorted(self.names_for(entity_type))) or "none"
            raise UnknownFeatureError(
                f"unknown features for entity type {entity_type!r}: {', '.join(bad)}; "
                f"known: {known}"
            )
        return refs

    def _window_refs(self, refs: Sequence[FeatureRef]) -> list[FeatureRef]:
        """The window features needed: requested ones plus the inputs of derived ones."""
        need: dict[str, FeatureRef] = {}
        for r in refs:
            if r.kind == "window":
                need.setdefault(r.name, r)
            else:
                for inp in r.derived.inputs:
                    need.setdefault(inp, self._refs[inp])
        return list(need.values())

    # ------------------------------------------------------------------ watermarks
    def watermarks(self, prefix: str) -> dict[str, int]:
        """The store's watermarks under ``prefix``, reused for ``watermark_ttl_ms``."""
        if not self.watermark_ttl_ms:
            return self.store.get_watermarks(prefix)
        now = self.clock()
        hit = self._marks.get(prefix)
        if hit is not None and now < hit[0]:
            return hit[1]
        marks = self.store.get_watermarks(prefix)
        self._marks[prefix] = (now + self.watermark_ttl_ms, marks)
        return marks

    def family_watermarks(self, specs: Sequence[FeatureSpec]) -> dict[tuple[str, str], int]:
        """Trusted watermark of each (topic, entity field) read: the lowest of its shards."""
        marks = self.watermarks("blocks/")
        out = {}
        for spec in specs:
            fam = (spec.source, spec.entity)
            if fam in out:
                continue
            prefix = f"blocks/{spec.source}/{spec.entity}/"
            vals = [v for k, v in marks.items() if k.startswith(prefix)]
            out[fam] = min(vals) if vals else NO_WATERMARK
        return out

    def snapshot_end(self, reads: Sequence[tuple[str, Sequence[str]]], *,
                     at: int | None = None) -> int:
        """One window end for all the reads of a request: ``(entity_type, names)`` each.

        The end of the last block every family read trusts (the lowest watermark over all of
        them), at or before ``at`` (default now), on a boundary of every read's streaming
        block. Reading each entity type with ``get_features(..., end=that)`` makes the whole
        request one snapshot: the values the backfill recomputes at the one logged end.
        ``NO_WATERMARK`` when a family has none yet (the reads give defaults).
        """
        at = self.clock() if at is None else int(at)
        specs: dict[str, FeatureSpec] = {}
        for entity_type, names in reads:
            for r in self._window_refs(self.resolve(entity_type, names)):
                specs[r.spec.key] = r.spec
        if not specs:
            return NO_WATERMARK
        wm = min(self.family_watermarks(list(specs.values())).values())
        if wm == NO_WATERMARK:
            return NO_WATERMARK
        step = max(s.streaming_block for s in specs.values())
        return align_down(min(wm, at), step)

    # ------------------------------------------------------------------ read
    def get_features(
        self,
        entity_type: str,
        ids: Sequence[str],
        names: Sequence[str],
        *,
        at: int | None = None,
        end: int | None = None,
        use_preassembled: bool = True,
    ) -> FeatureVectors:
        """Return the feature matrix of ``ids`` x ``names`` at time ``at`` (default now).

        Args:
            end: read at exactly this window end (a request's ``snapshot_end``) instead of
                the read's own latest trusted end (``at`` then only measures the lag).
                Pre-assembled values are used only where they were assembled at this end.

        Raises:
            UnknownFeatureError: a name is not a feature of ``entity_type``.
            HistoricalReadError: ``at`` (or ``end``) is more than one block before the
                watermark.
        """
        at = self.clock() if at is None else int(at)  # with ``end``: only for the lag
        refs = self.resolve(entity_type, names)
        wrefs = self._window_refs(refs)
        specs = list({r.spec.key: r.spec for r in wrefs}.values())
        finest = min((s.streaming_block for s in specs), default=1)
        fam_wm = self.family_watermarks(specs)
        wm = min(fam_wm.values(), default=align_down(at, finest))

        pre_cols = None
        if use_preassembled and wrefs:
            pre_cols, pre_wm = self._preassembled_columns(entity_type, wrefs, wm, specs)
            if pre_cols is not None and end is None:
                wm = pre_wm
            elif pre_cols is not None and pre_wm < end:
                pre_cols = None  # assembled at an older end than this snapshot's
        # the end of the last trusted block: a block boundary at or before both wm and t
        if end is not None:
            end = int(end) if wm != NO_WATERMARK and end != NO_WATERMARK else NO_WATERMARK
            if end != NO_WATERMARK and end > wm:
                raise HistoricalReadError(
                    f"end={end} ({to_iso(end)}) is after the {entity_type} features' "
                    f"watermark {_shown(wm, finest)}: take the end from snapshot_end over "
                    "every read of the request")
        else:
            end = align_down(min(wm, at), finest) if wm != NO_WATERMARK else NO_WATERMARK
        if end != NO_WATERMARK and end < wm - finest - READ_LAG_MS:
            raise HistoricalReadError(
                f"a read ending at {end} ({to_iso(end)}) is {(align_down(wm, finest) - end) // 1000} s "
                f"before the {entity_type} features' watermark {_shown(wm, finest)}: the online "
                f"store keeps the blocks of reads ending up to {(finest + READ_LAG_MS) // 1000} s "
                "before it (per-size retention); compute past values offline instead "
                "(`tessera backfill --spine`)"
            )

        uniq = list(dict.fromkeys(ids))
        pos = {e: i for i, e in enumerate(uniq)}
        n, wnames = len(uniq), [r.name for r in wrefs]
        wvals = np.full((n, len(wrefs)), np.nan, dtype=np.float64)
        wmiss = np.ones((n, len(wrefs)), dtype=bool)
        lists: dict[str, list] = {r.name: [None] * n for r in wrefs if not r.numeric}
        sources = {"cache": 0, "preassembled": 0, "blocks": 0}

        todo = np.ones(n, dtype=bool)
        from_cache = np.zeros(n, dtype=bool)
        cache_key = (entity_type, tuple(wnames), end)
        if self.cache is not None and end != NO_WATERMARK:
            for i, e in enumerate(uniq):
                hit = self.cache.get(entity_type, (cache_key, e))
                if hit is not None:
                    wvals[i], wmiss[i] = hit[0], hit[1]
                    for name, value in hit[2].items():
                        lists[name][i] = value
                    todo[i] = False
                    from_cache[i] = True
                    sources["cache"] += 1

        if pre_cols is not None and todo.any():
            idx = np.flatnonzero(todo)
            res = self.store.get_values(entity_type, self.table, [uniq[i] for i in idx])
            fresh = res.watermarks == end
            if fresh.any():
                cols = [res.columns.index(nm) for nm in wnames]
                got = res.matrix[np.ix_(fresh, cols)].astype(np.float64)
                rows = idx[fresh]
                wvals[rows] = got
                wmiss[rows] = np.isnan(got)
                todo[rows] = False
                sources["preassembled"] += int(fresh.sum())

        if todo.any() and end != NO_WATERMARK:
            idx = np.flatnonzero(todo)
            self._assemble_blocks(entity_type, [uniq[i] for i in idx], idx, wrefs, end,
                                  wvals, wmiss, lists)
            sources["blocks"] += len(idx)

        if self.cache is not None and end != NO_WATERMARK:
            for i in np.flatnonzero(~from_cache).tolist():
                extra = {nm: lists[nm][i] for nm in lists}
                self.cache.put(entity_type, (cache_key, uniq[i]),
                               (wvals[i].copy(), wmiss[i].copy(), extra))

        # defaults for missing window values
        for j, r in enumerate(wrefs):
            if r.numeric:
                wvals[wmiss[:, j], j] = r.spec.default

        values = np.full((n, len(refs)), np.nan, dtype=np.float32)
        missing = np.zeros((n, len(refs)), dtype=bool)
        col_of = {nm: j for j, nm in enumerate(wnames)}
        out_lists: dict[str, list] = {}
        for k, r in enumerate(refs):
            if r.kind == "window":
                j = col_of[r.name]
                values[:, k] = wvals[:, j]
                missing[:, k] = wmiss[:, j]
                if not r.numeric:
                    out_lists[r.name] = [lists[r.name][i] or [] for i in range(n)]
            else:
                cols = {inp: wvals[:, col_of[inp]] for inp in r.derived.inputs}
                values[:, k] = self._derived[r.name].evaluate_columns(
                    cols, n, default=r.derived.default)
                missing[:, k] = np.all([wmiss[:, col_of[inp]] for inp in r.derived.inputs], axis=0)

        inverse = np.fromiter((pos[e] for e in ids), dtype=np.int64, count=len(ids))
        lag = align_down(at, finest) - end if end != NO_WATERMARK else at
        replaying = replaymarks.pending(self.watermarks(replaymarks.PREFIX))
        stale = tuple(
            r.name for r in refs
            if lag > min((s.freshness for s in self._specs_of(r)), default=lag)
            or any(s.key in replaying for s in self._specs_of(r))
        )
        return FeatureVectors(
            entity_type=entity_type, ids=list(ids), names=[r.name for r in refs],
            values=values[inverse], missing=missing[inverse], watermark=end, at=at,
            stale=stale, lag_ms=lag, sources=sources,
            lists={nm: [v[i] for i in inverse.tolist()] for nm, v in out_lists.items()},
        )

    def _specs_of(self, ref: FeatureRef) -> list[FeatureSpec]:
        if ref.spec is not None:
            return [ref.spec]
        return [self._refs[i].spec for i in ref.derived.inputs]

    def _preassembled_columns(self, entity_type, wrefs, wm, specs):
        """Use pre-assembled values when they hold every needed window value and are fresh."""
        if any(not r.numeric for r in wrefs):
            return None, None
        marks = self.watermarks(f"values/{entity_type}/{self.table}")
        table_wm = marks.get(f"values/{entity_type}/{self.table}")
        if table_wm is None or table_wm > wm or wm - table_wm > min(s.freshness for s in specs):
            return None, None
        cols = self.store.get_meta(f"values-columns/{entity_type}/{self.table}")
        if cols is None:
            return None, None
        have = set(cols.decode().split(","))
        if not all(r.name in have for r in wrefs):
            return None, None
        return True, table_wm

    def _assemble_blocks(self, entity_type, ids, rows, wrefs, end, wvals, wmiss, lists):
        """Assemble window values from blocks for ``ids`` into ``wvals[rows]``."""
        col_of = {r.name: j for j, r in enumerate(wrefs)}
        by_family: dict[str, list[FeatureRef]] = {}
        for r in wrefs:
            by_family.setdefault(r.spec.source, []).append(r)
        for family, frefs in by_family.items():
            tables = self.store.get_block_tables(entity_type, family, ids)
            present = np.array([t is not None for t in tables], dtype=bool)
            fam = _family_columns(tables) if len(ids) > 8 else None
            by_spec: dict[str, list[FeatureRef]] = {}
            for r in frefs:
                by_spec.setdefault(r.spec.key, []).append(r)
            for key, srefs in by_spec.items():
                spec = srefs[0].spec
                agg = self._aggs[key]
                covers = [cover_window(*_bounds(spec, r.window, end), spec.block_sizes) for r in srefs]
                if agg.rep_dtype is not None and fam is not None:
                    arrays = _assemble_many(agg, fam, len(tables), key, covers, spec.block_sizes)
                    for r, arr in zip(srefs, arrays):
                        vals, empty = _finalize_fixed(agg, arr, np.nan)
                        ok = present & ~empty
                        j = col_of[r.name]
                        wvals[rows[ok], j] = vals[ok]
                        wmiss[rows[ok], j] = False
                    continue
                else:
                    reps = _assemble_each(agg, tables, key, covers)
                for r, rep_list in zip(srefs, reps):
                    j = col_of[r.name]
                    for i, rep in enumerate(rep_list):
                        if not present[i]:
                            continue
                        value = agg.finalize(rep)
                        if r.numeric:
                            if value is not None:
                                wvals[rows[i], j] = value
                                wmiss[rows[i], j] = False
                        else:
                            lists[r.name][rows[i]] = value
                            wmiss[rows[i], j] = False

    # ------------------------------------------------------------------ sequences
    def get_sequences(self, ids: Sequence[str], max_len: int = 50,
                      entity_type: str = "user") -> SequenceBatch:
        """Recent actions of ``ids`` as padded arrays (most recent first)."""
        seqs = self.store.get_sequences(entity_type, list(ids), max_len)
        n = len(ids)
        width = max((len(s) for s in seqs), default=0)
        item_ids = np.full((n, width), "", dtype=object)
        actions = np.full((n, width), "", dtype=object)
        ts = np.zeros((n, width), dtype=np.int64)
        dwell = np.zeros((n, width), dtype=np.int64)
        lengths = np.zeros(n, dtype=np.int32)
        for i, s in enumerate(seqs):
            k = len(s)
            lengths[i] = k
            if k:
                item_ids[i, :k] = s.item_ids
                actions[i, :k] = s.actions
                ts[i, :k] = s.ts
                dwell[i, :k] = s.dwell_ms
        return SequenceBatch(list(ids), item_ids, actions, ts, dwell, lengths)


def _bounds(spec: FeatureSpec, window: int, end: int) -> tuple[int, int]:
    wb = window_bounds(end, window, end, spec.block_sizes)
    return wb.start, wb.end


def _assemble_each(agg, tables, key, covers) -> list[list[Any]]:
    """Per entity: select the cover's rows and combine them (any aggregation)."""
    out = [[] for _ in covers]
    for table in tables:
        if table is None:
            for o in out:
                o.append(agg.identity())
            continue
        fb = table.feature_blocks(key)
        unpacked = agg.unpack(fb.blob, fb.offsets) if len(fb.starts) else None
        for c, cover in enumerate(covers):
            if unpacked is None:
                out[c].append(agg.identity())
                continue
            rows = select_cover_rows(fb.starts, fb.sizes, cover)
            out[c].append(agg.reduce_rows(unpacked, rows))
    return out


@dataclass
class _FamilyColumns:
    """The blocks of many entities' records of one family, concatenated into columns."""

    entity: np.ndarray
    feature: np.ndarray  # index into ``keys``
    starts: np.ndarray
    sizes: np.ndarray
    rep_start: np.ndarray
    rep_len: np.ndarray
    blob: np.ndarray  # uint8
    keys: list[str]


def _family_columns(tables: list) -> _FamilyColumns:
    """Concatenate records with a few Python steps per record and no Python per block."""
    gid: dict[str, int] = {}
    maps: dict[tuple[str, ...], np.ndarray] = {}
    counts, fid, st, sz, off, blobs, bases = [], [], [], [], [], [], []
    base = 0
    for t in tables:
        n = 0 if t is None else len(t)
        counts.append(n)
        if n == 0:
            continue
        fmap = maps.get(t.features)
        if fmap is None:
            fmap = maps[t.features] = np.array([gid.setdefault(k, len(gid)) for k in t.features],
                                               dtype=np.int64)
        fid.append(fmap[t.feature_idx])
        st.append(t.starts)
        sz.append(t.sizes)
        o = t.offsets
        off.append(o[:-1])
        bases.append(base)
        blob = t.blob[: int(o[-1])]
        blobs.append(blob)
        base += len(blob)
    if not fid:
        z = np.zeros(0, np.int64)
        return _FamilyColumns(z, z, z, z, z, z, np.zeros(0, np.uint8), [])
    cnt = np.asarray(counts, dtype=np.int64)
    nonzero = cnt[cnt > 0]
    return _FamilyColumns(
        np.repeat(np.arange(len(tables), dtype=np.int64), cnt), np.concatenate(fid),
        np.concatenate(st), np.concatenate(sz),
        np.concatenate(off).astype(np.int64) + np.repeat(np.asarray(bases, np.int64), nonzero),
        np.zeros(0, np.int64), np.frombuffer(b"".join(blobs), dtype=np.uint8), list(gid),
    )


def _assemble_many(agg, fam: _FamilyColumns, n_tables: int, key, covers, sizes) -> list[np.ndarray]:
    """Many entities, fixed-width reps: one ``BlockIndex`` over all their rows."""
    if key not in fam.keys:
        return [agg.identity_array(n_tables) for _ in covers]
    rows = np.flatnonzero(fam.feature == fam.keys.index(key))
    width = agg.rep_dtype.itemsize
    starts = fam.rep_start[rows]
    gather = (starts[:, None] + np.arange(width)[None, :]).reshape(-1)
    reps = np.frombuffer(fam.blob[gather].tobytes(), dtype=agg.rep_dtype)
    index = BlockIndex(fam.entity[rows], fam.sizes[rows], fam.starts[rows], reps, sizes)
    ents = np.arange(n_tables, dtype=np.int64)
    return [index.assemble(agg, ents, cover) for cover in covers]
