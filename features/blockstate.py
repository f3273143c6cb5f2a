"""Streaming block aggregation, independent of any stream engine.

``BlockShard`` keeps the open blocks of one shard of entities for the features of one
(topic, entity field), folds batches of events into them with numpy, and hands out the
blocks to write: every changed block (``flush``: the full rep, an idempotent overwrite) and
every block the watermark has passed (sealed: final, then evicted from memory).

Lateness is decided upstream, per source partition and in partition order
(``classify_late``), so which events count never depends on batching, worker count or
timing: the same input gives the same blocks on one worker or a cluster, and after a
crash-and-replay.

Order of calls: ``add_batch`` any number of times, ``flush`` when a write is due,
``advance(partition, watermark)`` as watermarks move. Only ``BlockShardState`` is
snapshotted for recovery.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from features.aggregations import Aggregation, build_aggregation
from features.aggregations.base import RepColumn
from features.expressions import CompiledExpr, parse_filter
from features.interning import StringInterner
from features.keyindex import KeyIndex
from features.spec import FeatureSpec
from features.store.blockbatch import BlockBatch, empty_batch
from features.watermarks import NO_WATERMARK, combined_watermark

_SLOT_BITS = 32
_SIZE_BITS = 3
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_NO_WATERMARK = NO_WATERMARK


@dataclass
class ShardFlush:
    """What one ``flush`` returns: the blocks to write, and which of them are sealed."""

    batch: BlockBatch
    sealed: np.ndarray

    def writes(self) -> list[BlockWrite]:
        """The blocks as ``BlockWrite`` tuples (slow; tests and debugging)."""
        rows = self.batch.to_rows()
        return [BlockWrite(e, f, s, z, r, bool(x))
                for (e, f, s, z, r), x in zip(rows, self.sealed.tolist())]


class BlockWrite(NamedTuple):
    """One block to write: the full rep of ``(entity_id, feature_key, start, size)``."""

    entity_id: str
    feature_key: str
    start: int
    size: int
    rep: bytes
    sealed: bool


def classify_late(prev_max: int, ts: np.ndarray, lateness: int) -> tuple[np.ndarray, int]:
    """Mark events later than ``lateness`` behind the partition's running maximum time.

    Event ``i`` is late when ``ts[i] < max(prev_max, ts[:i]) - lateness``. Depends only on
    the order of events within the partition, not on how they are batched.

    Returns:
        (late mask, new running maximum)
    """
    if len(ts) == 0:
        return np.zeros(0, dtype=bool), prev_max
    running = np.maximum.accumulate(np.concatenate(([prev_max], ts.astype(np.int64))))
    late = ts < running[:-1] - lateness
    return late, int(running[-1])


@dataclass(frozen=True, kw_only=True)
class BlockShardConfig:
    """What one shard aggregates: features of one topic keyed by the same entity field."""

    topic: str
    entity_field: str
    features: tuple[FeatureSpec, ...]

    def __post_init__(self) -> None:
        if not self.features:
            raise ValueError("a block shard needs at least one feature")
        for f in self.features:
            if f.source != self.topic or f.entity != self.entity_field:
                raise ValueError(
                    f"feature {f.name!r} reads {f.source}.{f.entity}, not "
                    f"{self.topic}.{self.entity_field}"
                )
            if len(f.block_sizes) > (1 << _SIZE_BITS):
                raise ValueError(f"feature {f.name!r} has more than 8 block sizes")

    @property
    def version(self) -> str:
        """Hash of the feature keys: state built for other definitions is never reused."""
        keys = ",".join(sorted(f.key for f in self.features))
        text = f"{self.topic}/{self.entity_field}/{keys}/state{STATE_FORMAT}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    @property
    def entity_type(self) -> str:
        """Entity type of the shard's key field (``item_id -> item``)."""
        return self.features[0].entity_type

    def build(self, state: BlockShardState | None = None) -> BlockShard:
        """Return the runtime shard, resumed from ``state`` when it matches this config."""
        return BlockShard(self, state)


STATE_FORMAT = 3
"""Layout of ``BlockShardState``; part of the shard version, so old snapshots are never reused."""


@dataclass
class FeatureBlocks:
    """Open blocks of one feature, as snapshotted: the block keys, flags and the reps' state.

    Features with the same block sizes share their rows: ``keys`` and ``done`` are those of
    the shared rows (one array object for all of them, pickled once), and ``present`` says
    which rows this feature has data in.
    """

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    reps: Any = None  # RepColumn.state(n)
    present: np.ndarray | None = None  # None: every row


@dataclass
class BlockShardState:
    """The snapshotted state of a shard (plain data: numpy arrays, dicts, bytes)."""

    version: str
    entity_ids: list[str] = field(default_factory=list)
    tables: list[FeatureBlocks] = field(default_factory=list)
    partition_watermarks: dict[str, int] = field(default_factory=dict)
    late_events: int = 0


class _FeatureRows:
    """One feature's reps over the rows of its ``_BlockRows``, and its per-row flags.

    ``present``: the feature folded an event into the row (a filtered feature has no block
    where none of its events fell, and such a row is never written for it). ``dirty``:
    changed since the last flush. ``written``: a version may be in the store.
    """

    def __init__(self, spec: FeatureSpec, agg: Aggregation, saved: FeatureBlocks, n: int
                 ) -> None:
        self.spec = spec
        self.column: RepColumn = agg.new_column(saved.reps if n else None)
        self.column.resize(n)
        self.dirty = _fit(saved.dirty, n)
        self.present = np.ones(n, bool) if saved.present is None else _fit(saved.present, n)
        self.written = self.present.copy()  # restored rows: assume a version was written

    def grow(self, n: int, capacity: int) -> None:
        """Make rows ``0..n-1`` usable, flags held for ``capacity`` rows."""
        self.column.resize(n)
        if capacity > len(self.dirty):
            self.dirty, self.present, self.written = (
                _grown(a, capacity) for a in (self.dirty, self.present, self.written))

    def keep(self, keep: np.ndarray) -> None:
        """Keep only rows ``keep`` (ascending), renumbered from 0."""
        self.column.keep(keep)
        self.column.resize(len(keep))
        self.dirty, self.present, self.written = (
            a[keep].copy() for a in (self.dirty, self.present, self.written))


class _BlockRows:
    """The open blocks of the features of a shard that share one list of block sizes.

    A row is one (entity, block size, block start): its key is ``entity code << 35 | size
    index << 32 | slot`` (slot: block start in units of the finest size), found with one
    ``KeyIndex`` lookup per batch for all the features, whose reps are columns over the same
    rows (``_FeatureRows``). ``done`` rows are sealed and written; they wait, never changing,
    until enough of them pile up to be evicted together (one pass, not one per flush).
    """

    def __init__(self, sizes: Sequence[int], features: list[tuple[int, FeatureSpec, Aggregation]],
                 saved: list[FeatureBlocks]) -> None:
        self.sizes = np.asarray(sizes, dtype=np.int64)
        self.finest = int(sizes[0])
        first = saved[0]
        n = len(first.keys)
        self.n = n
        self.keys = np.asarray(first.keys, np.int64).copy()
        self.done = _fit(first.done, n)
        self.ends = self._ends(self.keys)
        self.index = KeyIndex(self.keys)
        self.feature_idx = [fi for fi, _, _ in features]
        self.features = [_FeatureRows(spec, agg, s, n)
                         for (_, spec, agg), s in zip(features, saved)]
        self.min_open_end = _min_or_none(self.ends[~self.done])

    def _ends(self, keys: np.ndarray) -> np.ndarray:
        starts = (keys & _SLOT_MASK) * self.finest
        return starts + self.sizes[(keys >> _SLOT_BITS) & 7]

    def keys_for(self, gcodes: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The block key of each event in every block size, size by size."""
        parts = []
        for si, size in enumerate(self.sizes.tolist()):
            slot = (ts - ts % size) // self.finest
            parts.append((gcodes << (_SLOT_BITS + _SIZE_BITS)) | (si << _SLOT_BITS) | slot)
        return np.concatenate(parts)

    def rows_for_unique(self, uniq: np.ndarray) -> np.ndarray:
        """The row of each of the sorted, distinct keys ``uniq``, adding rows for new keys."""
        rows = self.index.lookup(uniq)
        new = np.flatnonzero(rows < 0)
        if len(new):
            start, k = self.n, len(new)
            self._grow(start + k)
            new_keys = uniq[new]
            new_rows = np.arange(start, start + k, dtype=np.int64)
            self.keys[start:start + k] = new_keys
            ends = self._ends(new_keys)
            self.ends[start:start + k] = ends
            self.index.insert(new_keys, new_rows)
            rows[new] = new_rows
            self.n = start + k
            for f in self.features:
                f.grow(self.n, len(self.keys))
            low = int(ends.min())
            self.min_open_end = low if self.min_open_end is None else min(self.min_open_end, low)
        return rows

    def _grow(self, need: int) -> None:
        cap = len(self.keys)
        if need <= cap:
            return
        size = max(need, 2 * cap, 1024)
        self.keys, self.ends, self.done = (
            _grown(a, size) for a in (self.keys, self.ends, self.done))

    def sealing(self, watermark: int | None) -> np.ndarray | None:
        """Rows not sealed yet that end by ``watermark`` (None when there are none)."""
        if watermark is None or self.min_open_end is None or watermark < self.min_open_end:
            return None
        n = self.n
        return ~self.done[:n] & (self.ends[:n] <= watermark)

    def to_write(self, f: _FeatureRows, sealing: np.ndarray | None, resend_sealed: bool,
                 expire: Mapping[int, int] | None) -> tuple[np.ndarray, np.ndarray]:
        """Rows of feature ``f`` to write now and which of them seal; marks them written.

        Rows to write: the changed ones, and (``resend_sealed``) those sealing now even if
        unchanged since their last write. Without ``resend_sealed``, a row of size ``s``
        ending at or before ``expire[s]`` that was never written is not written at all: the
        store would drop it in the same write (it is past the retention of every window). A
        row written before is sent, so that the write drops its older version.
        """
        n = self.n
        changed = f.dirty[:n]
        if expire and not resend_sealed and sealing is not None:
            limit = np.full(len(self.sizes), np.iinfo(np.int64).min, dtype=np.int64)
            for i, size in enumerate(self.sizes.tolist()):
                limit[i] = expire.get(size, limit[i])
            size_idx = (self.keys[:n] >> _SLOT_BITS) & 7
            changed = changed & ((self.ends[:n] > limit[size_idx]) | f.written[:n])
        send = changed if sealing is None or not resend_sealed else \
            changed | (sealing & f.present[:n])
        rows = np.flatnonzero(send)
        f.written[rows] = True
        f.dirty[:n] = False
        if sealing is None:
            return rows, np.zeros(len(rows), dtype=bool)
        return rows, sealing[rows]

    def seal(self, sealing: np.ndarray | None) -> None:
        """Mark ``sealing`` rows done (after every feature took what it writes of them)."""
        if sealing is None:
            return
        n = self.n
        self.done[:n] |= sealing
        self.min_open_end = _min_or_none(self.ends[:n][~self.done[:n]])

    def evict_done(self, force: bool = False) -> None:
        """Drop sealed rows from memory once they are a quarter of the rows (or ``force``)."""
        n = self.n
        done = int(self.done[:n].sum())
        if not done or (not force and done * 4 < n):
            return
        keep = np.flatnonzero(~self.done[:n])
        old_to_new = np.full(n, -1, dtype=np.int64)
        old_to_new[keep] = np.arange(len(keep), dtype=np.int64)
        self.index.remap(old_to_new)
        self.keys, self.ends, self.done = (a[keep].copy() for a in (self.keys, self.ends,
                                                                     self.done))
        self.n = len(keep)
        for f in self.features:
            f.keep(keep)

    def snapshot(self) -> list[FeatureBlocks]:
        n = self.n
        keys, done = self.keys[:n].copy(), self.done[:n].copy()
        return [FeatureBlocks(keys=keys, dirty=f.dirty[:n].copy(), done=done,
                              reps=f.column.state(n), present=f.present[:n].copy())
                for f in self.features]


def _fit(values: Any, n: int) -> np.ndarray:
    """A bool array of length ``n``: ``values`` when it has that length, else all False."""
    arr = np.asarray(values, bool)
    return arr.copy() if len(arr) == n else np.zeros(n, bool)


def _grown(arr: np.ndarray, size: int) -> np.ndarray:
    """``arr`` followed by zeros up to ``size`` entries."""
    out = np.zeros(size, dtype=arr.dtype)
    out[:len(arr)] = arr
    return out


def _min_or_none(values: np.ndarray) -> int | None:
    return int(values.min()) if len(values) else None


class BlockShard:
    """Runtime logic of one shard, made from a ``BlockShardConfig``."""

    def __init__(self, config: BlockShardConfig, state: BlockShardState | None) -> None:
        self.config = config
        self.aggs: list[Aggregation] = [build_aggregation(f) for f in config.features]
        self.filters: list[CompiledExpr | None] = [
            parse_filter(f.filter) if f.filter else None for f in config.features
        ]
        if state is None or state.version != config.version:
            state = BlockShardState(version=config.version,
                                    tables=[FeatureBlocks() for _ in config.features])
        self.state = state
        self.entities = StringInterner(list(state.entity_ids))
        by_sizes: dict[tuple[int, ...], list[int]] = {}
        for fi, spec in enumerate(config.features):
            by_sizes.setdefault(tuple(spec.block_sizes), []).append(fi)
        self.groups = [
            _BlockRows(sizes, [(fi, config.features[fi], self.aggs[fi]) for fi in fis],
                       [state.tables[fi] for fi in fis])
            for sizes, fis in by_sizes.items()
        ]
        #: feature index -> (its rows, its columns)
        self._rows_of: dict[int, tuple[_BlockRows, _FeatureRows]] = {
            fi: (g, f) for g in self.groups for fi, f in zip(g.feature_idx, g.features)}

    # ------------------------------------------------------------------ ingest
    def add_batch(self, columns: Any) -> int:
        """Fold a batch of (on-time) events into the open blocks; return events used.

        Args:
            columns: a ``schemas.columnar.EventColumns`` of the shard's topic.
        """
        n = len(columns)
        if n == 0:
            return 0
        gcodes = self._global_codes(columns.columns[self.config.entity_field])
        ts_all = np.asarray(columns.columns["event_ts"], dtype=np.int64)
        keyed = gcodes >= 0
        masks: dict[int, np.ndarray] = {}
        for fi, spec in enumerate(self.config.features):
            mask = keyed.copy()
            flt = self.filters[fi]
            if flt is not None:
                mask &= np.asarray(flt.evaluate_columns(columns.columns, n), dtype=bool)
            if self.aggs[fi].needs_value:
                mask &= _not_null(columns.columns[spec.value])
            if mask.any():
                masks[fi] = mask
        used = 0
        for group in self.groups:
            fis = [fi for fi in group.feature_idx if fi in masks]
            if not fis:
                continue
            # One key per event and block size, sorted once; one index lookup for all the
            # group's features, only for keys some feature's events use.
            reps = len(group.sizes)
            keys = group.keys_for(np.where(keyed, gcodes, 0), ts_all)
            uniq, inv = np.unique(keys, return_inverse=True)
            inv = inv.reshape(reps, n)
            any_event = np.logical_or.reduce([masks[fi] for fi in fis])
            wanted = np.zeros(len(uniq), dtype=bool)
            wanted[inv[:, any_event].ravel()] = True
            which = np.flatnonzero(wanted)
            row_of = np.full(len(uniq), -1, dtype=np.int64)
            row_of[which] = group.rows_for_unique(uniq[which])
            for fi in fis:
                idx = np.flatnonzero(masks[fi])
                used += len(idx)
                rows = row_of[inv[:, idx].ravel()]
                feat = self._rows_of[fi][1]
                raw = columns.columns[self.config.features[fi].value] \
                    if self.aggs[fi].needs_value else None
                feat.column.fold(rows, _repeat_values(raw, idx, reps), np.tile(ts_all[idx], reps))
                feat.dirty[rows] = True
                feat.present[rows] = True
        return used

    def _global_codes(self, col: Any) -> np.ndarray:
        """The shard-wide code of each event's entity (-1 for a null key), interned in bulk."""
        codes = np.asarray(col.codes)
        lut = np.full(len(col.dictionary) + 1, -1, dtype=np.int64)  # last: a null key
        # A shard's columns keep the whole batch's dictionary: intern only what it uses.
        used = np.zeros(len(lut), dtype=bool)
        used[codes] = True
        used[-1] = False
        which = np.flatnonzero(used)
        if len(which) == len(col.dictionary):
            lut[:-1] = self.entities.intern(col.dictionary)
        elif len(which):
            lut[which] = self.entities.intern(np.asarray(col.dictionary, dtype=object)[which])
        return lut[codes]

    # ------------------------------------------------------------------ watermarks
    def advance(self, partition: str, watermark: int) -> None:
        """Record that ``partition`` will send no more on-time events before ``watermark``."""
        prev = self.state.partition_watermarks.get(partition, _NO_WATERMARK)
        if watermark > prev:
            self.state.partition_watermarks[partition] = watermark

    def watermark(self, partitions: Sequence[str]) -> int:
        """Minimum watermark over ``partitions`` (a partition never heard from holds it back;
        an idle one does not: ``features.watermarks``)."""
        return combined_watermark(self.state.partition_watermarks, partitions)

    # ------------------------------------------------------------------ output
    def flush(self, watermark: int | None = None, *, resend_sealed: bool = True,
              expire: Mapping[int, int] | None = None) -> ShardFlush:
        """Return every changed block (full rep), and seal blocks ending by ``watermark``.

        With ``resend_sealed`` a sealed block is returned once more with ``sealed`` set (even
        if unchanged) so that the offline table receives each closed block; without it (no
        offline table to feed) only changed blocks are returned. A sealed block is then never
        returned again and is evicted from memory. The result is columnar (``BlockBatch``):
        no Python object per block, entity ids in order and each feature's rows in entity
        order (``ids_sorted``). ``expire`` ({size: ts}, used only without
        ``resend_sealed``) leaves out blocks the store would drop on arrival (see
        ``_BlockRows.to_write``).
        """
        sealing = {id(g): g.sealing(watermark) for g in self.groups}
        plan: list[tuple[int, _BlockRows, _FeatureRows, np.ndarray, np.ndarray]] = []
        for fi in range(len(self.config.features)):
            group, feat = self._rows_of[fi]
            if group.n == 0:
                continue
            rows, sealed = group.to_write(feat, sealing[id(group)], resend_sealed, expire)
            if len(rows):
                plan.append((fi, group, feat, rows, sealed))
        if not plan:
            for group in self.groups:
                group.seal(sealing[id(group)])
                group.evict_done()
            return ShardFlush(empty_batch(), np.zeros(0, dtype=bool))
        # Entities in id order, and each feature's rows in that order: a store writes the
        # batch in key ranges (``BlockBatch.chunks``), each then a slice of every feature's
        # rows, so no rep is copied to regroup them.
        codes_of = [group.keys[rows] >> (_SLOT_BITS + _SIZE_BITS)
                    for _, group, _, rows, _ in plan]
        seen = np.zeros(len(self.entities), dtype=bool)
        for codes in codes_of:
            seen[codes] = True
        uniq = np.flatnonzero(seen)
        by_id = uniq[np.argsort(self.entities.values[uniq].astype("U"), kind="stable")]
        rank = np.empty(len(self.entities), dtype=np.int64)
        rank[by_id] = np.arange(len(by_id), dtype=np.int64)
        # The batch's columns are filled in place, feature by feature: a large flush (a
        # catch-up flush writes millions of rows) never holds its rows twice.
        total = sum(len(p[3]) for p in plan)
        ent_idx, fidx, starts, sizes, sealed_all = (
            np.empty(total, np.int64), np.empty(total, np.int64), np.empty(total, np.int64),
            np.empty(total, np.int64), np.empty(total, bool))
        offsets = np.zeros(total + 1, dtype=np.int64)
        blobs: list[bytes] = []
        at = 0
        last: tuple[np.ndarray, np.ndarray] | None = None  # the last feature's rows, order
        for (fi, group, feat, rows, sealed), codes in zip(plan, codes_of):
            if last is not None and np.array_equal(last[0], rows):
                order = last[1]  # features of a group often write the same rows
            else:
                order = np.argsort(rank[codes], kind="stable")
                last = (rows, order)
            rows = rows[order]
            end = at + len(rows)
            blob, lengths = feat.column.serialize(rows)
            keys = group.keys[rows]
            ent_idx[at:end] = rank[codes[order]]
            fidx[at:end] = fi
            row_sizes = group.sizes[(keys >> _SLOT_BITS) & 7]
            np.subtract(group.ends[rows], row_sizes, out=starts[at:end])
            sizes[at:end] = row_sizes
            offsets[at + 1:end + 1] = lengths
            sealed_all[at:end] = sealed[order]
            blobs.append(blob)
            at = end
        for group in self.groups:
            group.seal(sealing[id(group)])
            group.evict_done()
        np.cumsum(offsets, out=offsets)
        batch = BlockBatch(
            entity_ids=self.entities.values[by_id].tolist(),
            entity_idx=ent_idx,
            feature_keys=[f.key for f in self.config.features],
            feature_idx=fidx,
            starts=starts,
            sizes=sizes,
            offsets=offsets,
            blob=b"".join(blobs),
            ids_sorted=True,
        )
        return ShardFlush(batch, sealed_all)

    def dirty_blocks(self) -> int:
        """Number of blocks changed since the last flush (what the next flush writes)."""
        return sum(int(np.count_nonzero(f.dirty[:g.n])) for g in self.groups for f in g.features)

    def open_blocks(self) -> int:
        """Number of blocks held in memory (open, or sealed and not evicted yet)."""
        return sum(int(np.count_nonzero(f.present[:g.n]))
                   for g in self.groups for f in g.features)

    # ------------------------------------------------------------------ recovery
    def snapshot(self) -> BlockShardState:
        """Return a copy of the state that can be pickled and resumed from."""
        tables: list[FeatureBlocks] = [FeatureBlocks()] * len(self.config.features)
        for g in self.groups:
            for fi, saved in zip(g.feature_idx, g.snapshot()):
                tables[fi] = saved
        return BlockShardState(
            version=self.state.version,
            entity_ids=self.entities.values.tolist(),
            tables=tables,
            partition_watermarks=dict(self.state.partition_watermarks),
            late_events=self.state.late_events,
        )


def _not_null(col: Any) -> np.ndarray:
    """Events whose value is present (not a null string, not NaN)."""
    if hasattr(col, "codes"):
        return np.asarray(col.codes) >= 0
    arr = np.asarray(col)
    if arr.dtype.kind == "f":
        return ~np.isnan(arr)
    if arr.dtype.kind == "O":
        return np.array([v is not None for v in arr.tolist()], dtype=bool)
    return np.ones(len(arr), dtype=bool)


def _repeat_values(col: Any, idx: np.ndarray, times: int) -> Any:
    """The values of events ``idx``, repeated ``times`` over (once per block size)."""
    if col is None:
        return None
    if hasattr(col, "codes"):
        return type(col)(np.tile(np.asarray(col.codes)[idx], times), col.dictionary)
    return np.tile(np.asarray(col)[idx], times)


def _value_column(col: Any) -> tuple[np.ndarray, np.ndarray]:
    """Return (values, not-null mask) for a numeric array or a dictionary string column."""
    if hasattr(col, "codes"):
        codes = np.asarray(col.codes)
        return col.values(), codes >= 0
    arr = np.asarray(col)
    if arr.dtype.kind == "f":
        return arr, ~np.isnan(arr)
    if arr.dtype.kind == "O":
        return arr, np.array([v is not None for v in arr.tolist()], dtype=bool)
    return arr.astype(np.float64), np.ones(len(arr), dtype=bool)
