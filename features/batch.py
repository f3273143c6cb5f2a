"""Batch correction and roll-ups: recompute blocks of a time range from the raw events.

``compute_blocks`` aggregates a range's raw events (late ones included: the raw archive has
every event) into streaming-size blocks, then rolls those up into every coarser size by
``combine``, the same algebra the streaming flow and the readers use. ``run_batch_blocks``
writes the result to the Iceberg blocks table (replacing the range's blocks: running it
twice changes nothing) and, by default, every size to the online store too, so that a read
after the correction serves exactly what the backfill recomputes (with only the roll-ups
online, a window's 5-minute edges would miss the late events its hours and days count).

Only blocks that lie entirely inside ``[from, to)`` are produced, so a range boundary never
writes a partial block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from features.aggregations import build_aggregation
from features.blockstate import _value_column
from features.expressions import parse_filter
from features.spec import FeatureSet, FeatureSpec
from features.store.blockbatch import BlockBatch
from features.tiling import retention
from features.timeutil import align_down, align_up, to_iso


@dataclass
class FeatureBlocksResult:
    """Blocks of one feature over a range, columnar.

    ``by_size[size] = (entity codes, starts, reps)``: codes index ``dictionary``; reps are a
    structured array (fixed-width aggregations) or a list of reps.
    """

    spec: FeatureSpec
    dictionary: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=object))
    by_size: dict[int, tuple[np.ndarray, np.ndarray, Any]] = field(default_factory=dict)

    def count(self) -> int:
        """Total number of blocks."""
        return sum(len(v[1]) for v in self.by_size.values())

    def rows(self, size: int) -> tuple[list[str], list[int], list[bytes]]:
        """The blocks of one size as (entity ids, starts, rep bytes) lists."""
        codes, starts, reps = self.by_size[size]
        agg = build_aggregation(self.spec)
        return self.dictionary[codes].tolist(), starts.tolist(), _rep_bytes(agg, reps)

    def to_arrow(self):
        """All blocks as a pyarrow table (entity_id, start_ms, size_ms, rep), built from the
        columns without a Python object per block for fixed-width reps."""
        import pyarrow as pa

        agg = build_aggregation(self.spec)
        codes, starts, sizes, reps = [], [], [], []
        for size, (c, s, r) in self.by_size.items():
            codes.append(c)
            starts.append(s)
            sizes.append(np.full(len(s), size, np.int64))
            reps.append(r)
        if not codes:
            return pa.table({"entity_id": pa.array([], pa.string()),
                             "start_ms": pa.array([], pa.int64()),
                             "size_ms": pa.array([], pa.int64()), "rep": pa.array([], pa.binary())})
        ent = pa.DictionaryArray.from_arrays(pa.array(np.concatenate(codes).astype(np.int32)),
                                             pa.array(self.dictionary.tolist(), pa.string()))
        if agg.rep_dtype is not None:
            data = np.concatenate(reps)
            w = agg.rep_dtype.itemsize
            offsets = (np.arange(len(data) + 1, dtype=np.int32) * w)
            rep = pa.Array.from_buffers(pa.binary(), len(data),
                                        [None, pa.py_buffer(offsets.tobytes()),
                                         pa.py_buffer(data.tobytes())])
        else:
            rep = pa.array([b for r in reps for b in _rep_bytes(agg, r)], pa.binary())
        return pa.table({"entity_id": ent, "start_ms": np.concatenate(starts),
                         "size_ms": np.concatenate(sizes), "rep": rep})


def compute_blocks(spec: FeatureSpec, columns, from_ts: int, to_ts: int) -> FeatureBlocksResult:
    """Blocks of ``spec`` from ``columns`` (the raw events of its topic) inside ``[from, to)``.

    Args:
        columns: ``schemas.columnar.EventColumns`` of ``spec.source``.
        from_ts, to_ts: aligned to the streaming block size.
    """
    agg = build_aggregation(spec)
    out = FeatureBlocksResult(spec)
    n = len(columns)
    if n == 0:
        return out
    cols = columns.columns
    ts = np.asarray(cols["event_ts"], dtype=np.int64)
    ent = cols[spec.entity]
    codes = np.asarray(ent.codes)
    mask = (codes >= 0) & (ts >= from_ts) & (ts < to_ts)
    if spec.filter:
        mask &= np.asarray(parse_filter(spec.filter).evaluate_columns(cols, n), dtype=bool)
    values = None
    if agg.needs_value:
        values, ok = _value_column(cols[spec.value])
        mask &= ok
    idx = np.flatnonzero(mask)
    if len(idx) == 0:
        return out
    codes, ts = codes[idx], ts[idx]
    values = None if values is None else values[idx]
    finest = spec.block_sizes[0]
    slot = (ts - ts % finest) // finest
    key = (codes.astype(np.int64) << 32) | slot
    uniq, inv = np.unique(key, return_inverse=True)
    reps = agg.group_reduce(inv.astype(np.int64), len(uniq), values, ts)
    b_codes = (uniq >> 32).astype(np.int64)
    b_starts = (uniq & 0xFFFFFFFF) * finest
    out.dictionary = np.asarray(ent.dictionary, dtype=object)
    out.by_size[finest] = (b_codes, b_starts, reps)
    for size in spec.block_sizes[1:]:
        starts = b_starts - b_starts % size
        inside = (starts >= from_ts) & (starts + size <= to_ts)
        if not inside.any():
            out.by_size[size] = (np.zeros(0, np.int64), np.zeros(0, np.int64),
                                 agg.identity_array(0) if agg.rep_dtype is not None else [])
            continue
        sel = np.flatnonzero(inside)
        ckey = (b_codes[sel] << 32) | (starts[sel] // finest)
        cuniq, cinv = np.unique(ckey, return_inverse=True)
        sub = reps[sel] if isinstance(reps, np.ndarray) else [reps[i] for i in sel.tolist()]
        rolled = agg.group_combine(cinv.astype(np.int64), len(cuniq), sub)
        out.by_size[size] = ((cuniq >> 32).astype(np.int64), (cuniq & 0xFFFFFFFF) * finest,
                             rolled)
    return out


def _rep_bytes(agg, reps) -> list[bytes]:
    if isinstance(reps, np.ndarray):
        raw = reps.tobytes()
        w = reps.dtype.itemsize
        return [raw[i * w:(i + 1) * w] for i in range(len(reps))]
    return [agg.to_bytes(r) for r in reps]


#: the columns of a feature's computed blocks (:func:`blocks_table`), whatever the engine
BLOCK_TABLE_SCHEMA = pa.schema([("feature_key", pa.string()), ("entity_id", pa.string()),
                                ("start_ms", pa.int64()), ("size_ms", pa.int64()),
                                ("rep", pa.binary())])


def input_fields(specs: Sequence[FeatureSpec]) -> set[str]:
    """The event fields ``compute_blocks`` reads for ``specs``: the time, each entity, value
    and filter field (a scan needs no others)."""
    out = {"event_ts"}
    for spec in specs:
        out.add(spec.entity)
        if spec.value:
            out.add(spec.value)
        if spec.filter:
            out |= parse_filter(spec.filter).fields
    return out


def blocks_table(spec: FeatureSpec, res: FeatureBlocksResult) -> pa.Table:
    """``res`` as a :data:`BLOCK_TABLE_SCHEMA` table (plain strings, so tables of the same
    feature from different shards concatenate)."""
    t = res.to_arrow()
    return pa.table({
        "feature_key": pa.repeat(pa.scalar(spec.key, pa.string()), t.num_rows),
        "entity_id": t.column("entity_id").cast(pa.string()),
        "start_ms": t.column("start_ms"),
        "size_ms": t.column("size_ms"),
        "rep": t.column("rep").cast(pa.binary()),
    }, schema=BLOCK_TABLE_SCHEMA)


def shard_blocks(topic: str, jobs: Sequence[tuple[FeatureSpec, int]], from_ts: int,
                 data: pa.Table) -> pa.Table:
    """The blocks of every ``(spec, end)`` of ``jobs`` over ``[from_ts, end)`` from raw rows of
    ``topic`` (``raw_<topic>`` columns): all of its rows, or every row of some entities.

    Events are put in :data:`features.offline.raw.EVENT_ORDER` first, so a shard holding all
    events of its entities gives exactly their blocks of a whole-table run.
    """
    from features.offline.raw import events_from_arrow

    cols = events_from_arrow(topic, data)
    parts = [blocks_table(spec, compute_blocks(spec, cols, from_ts, end)) for spec, end in jobs]
    return pa.concat_tables(parts) if parts else BLOCK_TABLE_SCHEMA.empty_table()


class BlocksEngine(Protocol):
    """Computes the blocks of one topic's features from its raw table."""

    def topic_blocks(self, topic: str, jobs: Sequence[tuple[FeatureSpec, int]], from_ts: int
                     ) -> tuple[int, dict[str, pa.Table]]:
        """Return (raw events read, ``{spec.key: blocks_table}``) for each ``(spec, end)``."""
        ...


@dataclass
class LocalBlocksEngine:
    """Every block in this process, from one scan of the raw table per topic."""

    raw: Any  # features.offline.raw.RawTables

    def topic_blocks(self, topic: str, jobs: Sequence[tuple[FeatureSpec, int]], from_ts: int
                     ) -> tuple[int, dict[str, pa.Table]]:
        cols = self.raw.scan_columns(topic, from_ts, max(end for _, end in jobs),
                                     input_fields([spec for spec, _ in jobs]))
        return len(cols), {spec.key: blocks_table(spec, compute_blocks(spec, cols, from_ts, end))
                           for spec, end in jobs}


def _count_by_size(spec: FeatureSpec, blocks: pa.Table) -> dict[int, int]:
    if not blocks.num_rows:
        return {}
    sizes = blocks.column("size_ms").to_numpy()
    return {size: int((sizes == size).sum()) for size in spec.block_sizes}


def _offline_rows(spec: FeatureSpec, blocks: pa.Table) -> pa.Table:
    """The blocks as rows of the Iceberg blocks table (written_ms added by the writer)."""
    return pa.table({
        "entity_type": pa.repeat(pa.scalar(spec.entity_type, pa.string()), blocks.num_rows),
        "entity_id": blocks.column("entity_id"), "feature_key": blocks.column("feature_key"),
        "start_ms": blocks.column("start_ms"), "size_ms": blocks.column("size_ms"),
        "rep": blocks.column("rep")})


def _store_rows(spec: FeatureSpec, blocks: pa.Table, online_sizes: str, now: int | None
                ) -> list[tuple[str, str, int, int, bytes]]:
    """The blocks a read at the store's watermark ``now`` can still need (all sizes, or the
    roll-ups only with ``online_sizes='coarse'``), as store rows."""
    if not blocks.num_rows:
        return []
    starts = blocks.column("start_ms").to_numpy()
    sizes = blocks.column("size_ms").to_numpy()
    keep = retention(spec.windows, spec.block_sizes)
    oldest_end = np.full(len(sizes), -(2**62), np.int64)
    if now is not None:
        for size, span in keep.items():
            oldest_end[sizes == size] = now - span
    wanted = starts + sizes > oldest_end
    if online_sizes != "all":
        wanted &= sizes != spec.streaming_block
    idx = np.flatnonzero(wanted)
    if not len(idx):
        return []
    sel = blocks.take(pa.array(idx))
    return list(zip(sel.column("entity_id").to_pylist(), [spec.key] * len(idx),
                    sel.column("start_ms").to_pylist(), sel.column("size_ms").to_pylist(),
                    sel.column("rep").to_pylist()))


@dataclass(frozen=True)
class BatchReport:
    """What one batch run wrote."""

    from_ts: int
    to_ts: int
    features: tuple[str, ...]
    blocks: dict[int, int]
    events: int
    seconds: float
    #: features whose range stopped before ``to_ts`` at the live flow's watermark: {name: end}
    held_back: dict[str, int] = field(default_factory=dict)


def _online_watermark(store, spec: FeatureSpec) -> int | None:
    """The lowest watermark of the streaming shards that write ``spec``'s family, if any."""
    marks = store.get_watermarks(f"blocks/{spec.source}/{spec.entity}/")
    return min(marks.values()) if marks else None


def run_batch_blocks(
    raw,
    tables,
    store,
    features: FeatureSet,
    from_ts: int,
    to_ts: int,
    *,
    names: Sequence[str] | None = None,
    online_sizes: str = "all",
    sealed_only: bool = False,
    progress: Callable[[str], None] | None = None,
    engine: BlocksEngine | None = None,
) -> BatchReport:
    """Recompute and write the blocks of ``[from, to)`` for the chosen features.

    Args:
        raw: ``features.offline.raw.RawTables`` (the raw archive).
        tables: ``features.offline.tables.OfflineTables`` (the blocks table).
        store: online store, or None to skip it. Only blocks a read at the store's
            watermark can still need are written there (``features.tiling.retention``).
        names: feature names (default: all).
        online_sizes: ``all`` (the default) or ``coarse`` (roll-ups only: the online
            streaming-size blocks keep their streaming version, late events left out).
        sealed_only: stop each feature's range at its live blocks flow's watermark in
            ``store`` (``held_back`` in the report says where): a block the flow has not
            sealed yet is left to it. The flow writes a block once more when it seals it,
            online and offline; a correction written before that would be undone offline
            and kept online. The flow publishes its watermark after the blocks, and stamps
            them before, so a correction made after reading it is the newer version in both.
        engine: where the blocks are computed: :class:`LocalBlocksEngine` (the default, this
            process) or ``features.ray_engine.RayBlocksEngine`` (a Ray cluster). Either
            returns the same blocks; the writes below are the same for both.
    """

    t0 = time.perf_counter()
    specs = [f for f in features.features if names is None or f.name in names]
    if not specs:
        raise ValueError(f"no features selected; known: {[f.name for f in features.features]}")
    finest = min(f.streaming_block for f in specs)
    from_ts, to_ts = align_down(from_ts, finest), align_up(to_ts, finest)
    blocks_count: dict[int, int] = {}
    events = 0
    ends = {s.key: to_ts for s in specs}
    held_back: dict[str, int] = {}
    # the live flow's watermark per feature, read once (the clamp and the retention use it)
    online_wm = {s.key: _online_watermark(store, s) for s in specs} if store is not None else {}
    if sealed_only:
        for spec in specs:
            wm = online_wm.get(spec.key)
            if wm is not None:
                end = max(from_ts, min(to_ts, align_down(max(wm, from_ts), spec.streaming_block)))
                if end < to_ts:
                    ends[spec.key] = end
                    held_back[spec.name] = end
        if progress:
            for end in sorted(set(held_back.values())):
                held = [n for n, e in held_back.items() if e == end]
                progress(f"up to {to_iso(end)}, the live blocks flow's watermark, for "
                         f"{', '.join(held)}: the flow seals the later blocks itself")
    engine = engine or LocalBlocksEngine(raw)
    for topic in sorted({s.source for s in specs}):
        topic_specs = [s for s in specs if s.source == topic and ends[s.key] > from_ts]
        if not topic_specs:
            continue
        jobs = [(s, ends[s.key]) for s in topic_specs]
        n_events, tables_by_key = engine.topic_blocks(topic, jobs, from_ts)
        events += n_events
        if progress:
            progress(f"{topic}: {n_events:,} raw events")
        for spec in topic_specs:
            blocks = tables_by_key[spec.key]
            for size, count in _count_by_size(spec, blocks).items():
                blocks_count[size] = blocks_count.get(size, 0) + count
            # replace this feature's blocks of the range in one commit (idempotent)
            tables.replace_blocks(spec.key, from_ts, ends[spec.key], _offline_rows(spec, blocks),
                                  sizes=spec.block_sizes)
            if store is not None:
                store_rows = _store_rows(spec, blocks, online_sizes, online_wm.get(spec.key))
                if store_rows:
                    store.put_block_batch(spec.entity_type, spec.source,
                                          BlockBatch.from_rows(store_rows))
            if progress:
                progress(f"{spec.name}: {blocks.num_rows:,} blocks")
    return BatchReport(from_ts, to_ts, tuple(s.name for s in specs), blocks_count, events,
                       time.perf_counter() - t0, held_back)
