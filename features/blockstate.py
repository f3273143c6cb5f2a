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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from features.aggregations import Aggregation, build_aggregation
from features.expressions import CompiledExpr, parse_filter
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
        return hashlib.sha256(f"{self.topic}/{self.entity_field}/{keys}".encode()).hexdigest()[:12]

    @property
    def entity_type(self) -> str:
        """Entity type of the shard's key field (``item_id -> item``)."""
        return self.features[0].entity_type

    def build(self, state: BlockShardState | None = None) -> BlockShard:
        """Return the runtime shard, resumed from ``state`` when it matches this config."""
        return BlockShard(self, state)


@dataclass
class FeatureBlocks:
    """Open blocks of one feature: rows addressed by a composite key, reps in one column."""

    index: dict[int, int] = field(default_factory=dict)
    keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    reps: Any = None  # structured array (fixed-width) or list of rep bytes
    dirty: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    n: int = 0


@dataclass
class BlockShardState:
    """The snapshotted state of a shard (plain data: numpy arrays, dicts, bytes)."""

    version: str
    entity_ids: list[str] = field(default_factory=list)
    tables: list[FeatureBlocks] = field(default_factory=list)
    partition_watermarks: dict[str, int] = field(default_factory=dict)
    late_events: int = 0


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
        self._codes: dict[str, int] = {e: i for i, e in enumerate(state.entity_ids)}
        # Variable-width reps live decoded in memory (``_live``); ``_ser`` caches their bytes
        # until the rep changes, so flushes and snapshots serialize each change once.
        self._live: list[list[Any] | None] = []
        self._ser: list[list[bytes | None] | None] = []
        for agg, table in zip(self.aggs, state.tables):
            if len(table.index) != table.n:  # snapshots leave the index out: rebuild it
                table.index = {k: i for i, k in enumerate(table.keys[:table.n].tolist())}
            if agg.rep_dtype is None:
                stored = list(table.reps or [])
                self._live.append([agg.from_bytes(b) for b in stored])
                self._ser.append(stored)
            else:
                if table.reps is None:
                    table.reps = np.zeros(0, dtype=agg.rep_dtype)
                self._live.append(None)
                self._ser.append(None)

    # ------------------------------------------------------------------ ingest
    def add_batch(self, columns: Any) -> int:
        """Fold a batch of (on-time) events into the open blocks; return events used.

        Args:
            columns: a ``schemas.columnar.EventColumns`` of the shard's topic.
        """
        n = len(columns)
        if n == 0:
            return 0
        ent_col = columns.columns[self.config.entity_field]
        gcodes = self._global_codes(ent_col)
        ts_all = np.asarray(columns.columns["event_ts"], dtype=np.int64)
        used = 0
        for fi, spec in enumerate(self.config.features):
            mask = gcodes >= 0
            flt = self.filters[fi]
            if flt is not None:
                mask &= np.asarray(flt.evaluate_columns(columns.columns, n), dtype=bool)
            values = None
            agg = self.aggs[fi]
            if agg.needs_value:
                values, ok = _value_column(columns.columns[spec.value])
                mask &= ok
            if not mask.any():
                continue
            idx = np.flatnonzero(mask)
            used += len(idx)
            self._fold(fi, gcodes[idx], ts_all[idx], None if values is None else values[idx])
        return used

    def _global_codes(self, col: Any) -> np.ndarray:
        codes = np.asarray(col.codes)
        lut = np.empty(len(col.dictionary) + 1, dtype=np.int64)
        for i, ent in enumerate(col.dictionary.tolist()):
            c = self._codes.get(ent)
            if c is None:
                c = len(self.state.entity_ids)
                self._codes[ent] = c
                self.state.entity_ids.append(ent)
            lut[i] = c
        lut[-1] = -1  # null entity key: the event has no entity for this feature
        return lut[codes]

    def _fold(self, fi: int, gcodes: np.ndarray, ts: np.ndarray, values: np.ndarray | None):
        spec = self.config.features[fi]
        agg = self.aggs[fi]
        table = self.state.tables[fi]
        finest = spec.block_sizes[0]
        for si, size in enumerate(spec.block_sizes):
            slot = (ts - ts % size) // finest
            keys = (gcodes << (_SLOT_BITS + _SIZE_BITS)) | (si << _SLOT_BITS) | slot
            uniq, inv = np.unique(keys, return_inverse=True)
            batch = agg.group_reduce(inv.astype(np.int64), len(uniq), values, ts)
            rows = self._rows_for(fi, table, uniq)
            if agg.rep_dtype is not None:
                table.reps[rows] = agg.combine_arrays(table.reps[rows], batch)
            else:
                live, ser = self._live[fi], self._ser[fi]
                combine = agg.combine
                for r, rep in zip(rows.tolist(), batch):
                    prev = live[r]
                    live[r] = rep if prev is None else combine(prev, rep)
                    ser[r] = None
            table.dirty[rows] = True

    def _rows_for(self, fi: int, table: FeatureBlocks, keys: np.ndarray) -> np.ndarray:
        index = table.index
        klist = keys.tolist()
        rows = [index.get(k, -1) for k in klist]
        new = [k for k, r in zip(klist, rows) if r < 0]
        if new:
            start = table.n
            self._grow(fi, table, start + len(new))
            for j, k in enumerate(new):
                index[k] = start + j
            table.keys[start:start + len(new)] = new
            table.n = start + len(new)
            rows = [index[k] for k in klist]
        return np.asarray(rows, dtype=np.int64)

    def _grow(self, fi: int, table: FeatureBlocks, need: int) -> None:
        cap = len(table.keys)
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 1024)
        agg = self.aggs[fi]
        keys = np.zeros(new_cap, dtype=np.int64)
        keys[:table.n] = table.keys[:table.n]
        dirty = np.zeros(new_cap, dtype=bool)
        dirty[:table.n] = table.dirty[:table.n]
        table.keys, table.dirty = keys, dirty
        if agg.rep_dtype is not None:
            reps = agg.identity_array(new_cap)
            reps[:table.n] = table.reps[:table.n]
            table.reps = reps
        else:
            live = self._live[fi]
            live.extend([None] * (new_cap - len(live)))  # a rep is made on first use
            ser = self._ser[fi]
            ser.extend([None] * (new_cap - len(ser)))

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
    def flush(self, watermark: int | None = None) -> ShardFlush:
        """Return every changed block (full rep), and seal and evict blocks ending by ``watermark``.

        A sealed block is returned once more with ``sealed`` set (even if unchanged) so that
        the offline table receives each closed block. The result is columnar (``BlockBatch``):
        no Python object per block.
        """
        codes_parts, fidx_parts, st_parts, sz_parts, len_parts, blobs, sealed_parts = (
            [], [], [], [], [], [], [])
        for fi, spec in enumerate(self.config.features):
            table = self.state.tables[fi]
            n = table.n
            if n == 0:
                continue
            keys = table.keys[:n]
            sizes = np.asarray(spec.block_sizes, dtype=np.int64)[(keys >> _SLOT_BITS) & 7]
            starts = (keys & _SLOT_MASK) * spec.block_sizes[0]
            sealed = (starts + sizes <= watermark) if watermark is not None else np.zeros(n, bool)
            rows = np.flatnonzero(table.dirty[:n] | sealed)
            if len(rows):
                blob, lengths = self._rep_blob(fi, table, rows)
                codes_parts.append(keys[rows] >> (_SLOT_BITS + _SIZE_BITS))
                fidx_parts.append(np.full(len(rows), fi, dtype=np.int64))
                st_parts.append(starts[rows])
                sz_parts.append(sizes[rows])
                len_parts.append(lengths)
                blobs.append(blob)
                sealed_parts.append(sealed[rows])
                table.dirty[:n] = False
            if sealed.any():
                self._evict(fi, table, ~sealed)
        if not codes_parts:
            return ShardFlush(empty_batch(), np.zeros(0, dtype=bool))
        codes = np.concatenate(codes_parts)
        uniq, inv = np.unique(codes, return_inverse=True)
        ents = self.state.entity_ids
        lengths = np.concatenate(len_parts)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        batch = BlockBatch(
            entity_ids=[ents[c] for c in uniq.tolist()],
            entity_idx=inv.astype(np.int64),
            feature_keys=[f.key for f in self.config.features],
            feature_idx=np.concatenate(fidx_parts),
            starts=np.concatenate(st_parts),
            sizes=np.concatenate(sz_parts),
            offsets=offsets,
            blob=b"".join(blobs),
        )
        return ShardFlush(batch, np.concatenate(sealed_parts))

    def _rep_blob(self, fi: int, table: FeatureBlocks, rows: np.ndarray) -> tuple[bytes, np.ndarray]:
        agg = self.aggs[fi]
        if agg.rep_dtype is not None:
            return table.reps[rows].tobytes(), np.full(len(rows), agg.rep_dtype.itemsize, np.int64)
        parts = self._serialized(fi, rows.tolist())
        return b"".join(parts), np.fromiter((len(p) for p in parts), np.int64, len(parts))

    def _serialized(self, fi: int, rows: list[int]) -> list[bytes]:
        live, ser, to_bytes = self._live[fi], self._ser[fi], self.aggs[fi].to_bytes
        out = []
        for r in rows:
            b = ser[r]
            if b is None:
                b = ser[r] = to_bytes(live[r])
            out.append(b)
        return out

    def _evict(self, fi: int, table: FeatureBlocks, keep: np.ndarray) -> None:
        rows = np.flatnonzero(keep)
        table.keys = table.keys[rows].copy()
        table.dirty = table.dirty[rows].copy()
        if self.aggs[fi].rep_dtype is not None:
            table.reps = table.reps[rows].copy()
        else:
            live, ser = self._live[fi], self._ser[fi]
            keep_rows = rows.tolist()
            self._live[fi] = [live[r] for r in keep_rows]
            self._ser[fi] = [ser[r] for r in keep_rows]
        table.n = len(rows)
        table.index = {k: i for i, k in enumerate(table.keys.tolist())}

    def open_blocks(self) -> int:
        """Number of blocks held in memory."""
        return sum(t.n for t in self.state.tables)

    # ------------------------------------------------------------------ recovery
    def snapshot(self) -> BlockShardState:
        """Return a copy of the state that can be pickled and resumed from."""
        tables = []
        for fi, t in enumerate(self.state.tables):
            n = t.n
            if self.aggs[fi].rep_dtype is not None:
                reps = t.reps[:n].copy()
            else:
                reps = self._serialized(fi, list(range(n)))
            # the index is rebuilt from the keys on resume: copying the dict costs more
            tables.append(FeatureBlocks(index={}, keys=t.keys[:n].copy(), reps=reps,
                                        dirty=t.dirty[:n].copy(), n=n))
        return BlockShardState(
            version=self.state.version,
            entity_ids=list(self.state.entity_ids),
            tables=tables,
            partition_watermarks=dict(self.state.partition_watermarks),
            late_events=self.state.late_events,
        )


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
