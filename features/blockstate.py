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

_SLOT_BITS = 32
_SIZE_BITS = 3
_SLOT_MASK = (1 << _SLOT_BITS) - 1
_NO_WATERMARK = -(2**62)


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


STATE_FORMAT = 2
"""Layout of ``BlockShardState``; part of the shard version, so old snapshots are never reused."""


@dataclass
class FeatureBlocks:
    """Open blocks of one feature, as snapshotted: block keys, flags and the reps' state."""

    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    done: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    reps: Any = None  # RepColumn.state(n)


@dataclass
class BlockShardState:
    """The snapshotted state of a shard (plain data: numpy arrays, dicts, bytes)."""

    version: str
    entity_ids: list[str] = field(default_factory=list)
    tables: list[FeatureBlocks] = field(default_factory=list)
    partition_watermarks: dict[str, int] = field(default_factory=dict)
    late_events: int = 0


class _OpenBlocks:
    """Runtime open blocks of one feature: rows addressed by a composite key (``KeyIndex``).

    A row's key is ``entity code << 35 | size index << 32 | slot`` (slot: block start in units
    of the finest size). ``done`` rows are sealed and written; they wait, never changing, until
    enough of them pile up to be evicted together (one pass over the table, not one per flush).
    """

    def __init__(self, spec: FeatureSpec, agg: Aggregation, saved: FeatureBlocks | None) -> None:
        self.spec = spec
        self.sizes = np.asarray(spec.block_sizes, dtype=np.int64)
        self.finest = int(spec.block_sizes[0])
        saved = saved or FeatureBlocks()
        n = len(saved.keys)
        self.n = n
        self.keys = np.asarray(saved.keys, np.int64).copy()
        self.dirty = np.asarray(saved.dirty, bool).copy()
        self.done = np.asarray(saved.done, bool).copy() if len(saved.done) == n \
            else np.zeros(n, bool)
        # whether a version of the row may be in the store (restored rows: assume so)
        self.written = np.ones(n, bool)
        self.ends = self._ends(self.keys)
        self.index = KeyIndex(self.keys)
        self.column: RepColumn = agg.new_column(saved.reps if n else None)
        self.column.resize(n)
        self.min_open_end = _min_or_none(self.ends[~self.done])

    def _ends(self, keys: np.ndarray) -> np.ndarray:
        starts = (keys & _SLOT_MASK) * self.finest
        return starts + self.sizes[(keys >> _SLOT_BITS) & 7]

    def keys_for(self, gcodes: np.ndarray, ts: np.ndarray) -> np.ndarray:
        """The block key of each event in every block size, size by size."""
        parts = []
        for si, size in enumerate(self.spec.block_sizes):
            slot = (ts - ts % size) // self.finest
            parts.append((gcodes << (_SLOT_BITS + _SIZE_BITS)) | (si << _SLOT_BITS) | slot)
        return np.concatenate(parts)

    def rows_for(self, keys: np.ndarray) -> np.ndarray:
        """The row of each key, adding rows for keys not seen yet."""
        uniq, inv = np.unique(keys, return_inverse=True)
        return self.rows_for_unique(uniq)[inv]

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
            self.column.resize(self.n)
            low = int(ends.min())
            self.min_open_end = low if self.min_open_end is None else min(self.min_open_end, low)
        return rows

    def _grow(self, need: int) -> None:
        cap = len(self.keys)
        if need <= cap:
            return
        size = max(need, 2 * cap, 1024)
        for name, dtype in (("keys", np.int64), ("ends", np.int64), ("dirty", bool),
                            ("done", bool), ("written", bool)):
            grown = np.zeros(size, dtype=dtype)
            grown[:self.n] = getattr(self, name)[:self.n]
            setattr(self, name, grown)

    def to_write(self, watermark: int | None, resend_sealed: bool = True,
                 expire: Mapping[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Rows to write now and which of them seal; marks them.

        Rows to write: the changed ones, and (``resend_sealed``) those sealing now even if
        unchanged since their last write. Without ``resend_sealed``, a row of size ``s``
        ending at or before ``expire[s]`` that was never written is not written at all: the
        store would drop it in the same write (it is past the retention of every window). A
        row written before is sent, so that the write drops its older version.
        """
        n = self.n
        sealing = None
        if watermark is not None and self.min_open_end is not None \
                and watermark >= self.min_open_end:
            sealing = ~self.done[:n] & (self.ends[:n] <= watermark)
        changed = self.dirty[:n]
        if expire and not resend_sealed and sealing is not None:
            limit = np.full(len(self.sizes), np.iinfo(np.int64).min, dtype=np.int64)
            for i, size in enumerate(self.sizes.tolist()):
                limit[i] = expire.get(size, limit[i])
            size_idx = (self.keys[:n] >> _SLOT_BITS) & 7
            changed = changed & ((self.ends[:n] > limit[size_idx]) | self.written[:n])
        send = changed if sealing is None or not resend_sealed else changed | sealing
        rows = np.flatnonzero(send)
        self.written[rows] = True
        self.dirty[:n] = False
        if sealing is None:
            return rows, np.zeros(len(rows), dtype=bool)
        self.done[:n] |= sealing
        self.min_open_end = _min_or_none(self.ends[:n][~self.done[:n]])
        return rows, sealing[rows]

    def evict_done(self, force: bool = False) -> None:
        """Drop sealed rows from memory once they are a quarter of the table (or ``force``)."""
        n = self.n
        done = int(self.done[:n].sum())
        if not done or (not force and done * 4 < n):
            return
        keep = np.flatnonzero(~self.done[:n])
        old_to_new = np.full(n, -1, dtype=np.int64)
        old_to_new[keep] = np.arange(len(keep), dtype=np.int64)
        self.column.keep(keep)
        self.index.remap(old_to_new)
        for name in ("keys", "ends", "dirty", "done", "written"):
            setattr(self, name, getattr(self, name)[keep].copy())
        self.n = len(keep)
        self.column.resize(self.n)

    def snapshot(self) -> FeatureBlocks:
        n = self.n
        return FeatureBlocks(keys=self.keys[:n].copy(), dirty=self.dirty[:n].copy(),
                             done=self.done[:n].copy(), reps=self.column.state(n))


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
        self.tables = [_OpenBlocks(spec, agg, saved)
                       for spec, agg, saved in zip(config.features, self.aggs, state.tables)]

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
        # Features with the same block sizes address the same blocks: the events' block
        # keys are made and sorted once per size list, not once per feature.
        shared: dict[tuple[int, ...], tuple[np.ndarray, np.ndarray]] = {}
        used = 0
        for fi, spec in enumerate(self.config.features):
            mask = keyed.copy()
            flt = self.filters[fi]
            if flt is not None:
                mask &= np.asarray(flt.evaluate_columns(columns.columns, n), dtype=bool)
            raw = None
            if self.aggs[fi].needs_value:
                raw = columns.columns[spec.value]
                mask &= _not_null(raw)
            idx = np.flatnonzero(mask)
            if not len(idx):
                continue
            used += len(idx)
            table = self.tables[fi]
            reps = len(spec.block_sizes)
            ts = ts_all[idx]
            sizes = tuple(spec.block_sizes)
            if sizes not in shared:
                keys = table.keys_for(np.where(keyed, gcodes, 0), ts_all)
                shared[sizes] = np.unique(keys, return_inverse=True)
            uniq, inv = shared[sizes]
            rows = _rows_of_events(table, uniq, inv.reshape(reps, n)[:, idx].ravel())
            table.column.fold(rows, _repeat_values(raw, idx, reps), np.tile(ts, reps))
            table.dirty[rows] = True
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
        """Minimum watermark over ``partitions`` (a partition never heard from holds it back)."""
        wms = self.state.partition_watermarks
        return min((wms.get(p, _NO_WATERMARK) for p in partitions), default=_NO_WATERMARK)

    # ------------------------------------------------------------------ output
    def flush(self, watermark: int | None = None, *, resend_sealed: bool = True,
              expire: Mapping[int, int] | None = None) -> ShardFlush:
        """Return every changed block (full rep), and seal blocks ending by ``watermark``.

        With ``resend_sealed`` a sealed block is returned once more with ``sealed`` set (even
        if unchanged) so that the offline table receives each closed block; without it (no
        offline table to feed) only changed blocks are returned. A sealed block is then never
        returned again and is evicted from memory. The result is columnar (``BlockBatch``):
        no Python object per block. ``expire`` ({size: ts}, used only without
        ``resend_sealed``) leaves out blocks the store would drop on arrival (see
        ``_OpenBlocks.to_write``).
        """
        codes_parts, fidx_parts, st_parts, sz_parts, len_parts, blobs, sealed_parts = (
            [], [], [], [], [], [], [])
        for fi, table in enumerate(self.tables):
            if table.n == 0:
                continue
            rows, sealed = table.to_write(watermark, resend_sealed, expire)
            if len(rows):
                blob, lengths = table.column.serialize(rows)
                keys = table.keys[rows]
                codes_parts.append(keys >> (_SLOT_BITS + _SIZE_BITS))
                fidx_parts.append(np.full(len(rows), fi, dtype=np.int64))
                sizes = table.sizes[(keys >> _SLOT_BITS) & 7]
                st_parts.append(table.ends[rows] - sizes)
                sz_parts.append(sizes)
                len_parts.append(lengths)
                blobs.append(blob)
                sealed_parts.append(sealed)
            table.evict_done()
        if not codes_parts:
            return ShardFlush(empty_batch(), np.zeros(0, dtype=bool))
        codes = np.concatenate(codes_parts)
        uniq, inv = np.unique(codes, return_inverse=True)
        lengths = np.concatenate(len_parts)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        batch = BlockBatch(
            entity_ids=self.entities.values[uniq].tolist(),
            entity_idx=inv.astype(np.int64),
            feature_keys=[f.key for f in self.config.features],
            feature_idx=np.concatenate(fidx_parts),
            starts=np.concatenate(st_parts),
            sizes=np.concatenate(sz_parts),
            offsets=offsets,
            blob=b"".join(blobs),
        )
        return ShardFlush(batch, np.concatenate(sealed_parts))

    def dirty_blocks(self) -> int:
        """Number of blocks changed since the last flush (what the next flush writes)."""
        return sum(int(np.count_nonzero(t.dirty[:t.n])) for t in self.tables)

    def open_blocks(self) -> int:
        """Number of blocks held in memory (open, or sealed and not evicted yet)."""
        return sum(t.n for t in self.tables)

    # ------------------------------------------------------------------ recovery
    def snapshot(self) -> BlockShardState:
        """Return a copy of the state that can be pickled and resumed from."""
        return BlockShardState(
            version=self.state.version,
            entity_ids=self.entities.values.tolist(),
            tables=[t.snapshot() for t in self.tables],
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


def _rows_of_events(table: _OpenBlocks, uniq: np.ndarray, sel: np.ndarray) -> np.ndarray:
    """The table row of each selected event-block (``uniq[sel]``), adding rows for new keys.

    ``uniq`` holds the sorted distinct keys of every event of the batch; only the keys
    ``sel`` uses reach the table (a filtered feature gets no row for a block it never saw).
    """
    used = np.zeros(len(uniq), dtype=bool)
    used[sel] = True
    which = np.flatnonzero(used)
    row_of = np.empty(len(uniq), dtype=np.int64)
    row_of[which] = table.rows_for_unique(uniq[which])
    return row_of[sel]


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
