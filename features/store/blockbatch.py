"""Block rows of many entities as columns, and the vectorized merge into their records.

The streaming flow hands the store thousands of changed blocks per flush. Merging them
entity by entity (decode, upsert, encode) costs a Python round of numpy calls per entity;
``merge_records`` instead decodes every affected record into one set of columns, merges and
deduplicates all of them with one ``lexsort``, applies per-size retention, gathers the reps
in one indexed copy, and only then cuts the result back into one ``TBT1`` record per entity.
The records it writes are byte-compatible with ``BlockTable.encode``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from features.store.blocktable import (
    _HEAD,
    _U16,
    _U32,
    MAGIC,
    VERSION,
    BlockTable,
    Buffer,
    _pad8,
    _parse_features,
)
from features.store.errors import CorruptRecordError


@dataclass
class BlockBatch:
    """Block rows ``(entity, feature, start, size, rep)`` of many entities, as columns.

    Attributes:
        entity_ids: distinct entity ids; ``entity_idx`` indexes into it.
        feature_keys: distinct feature keys; ``feature_idx`` indexes into it.
        starts, sizes: int64 per row.
        offsets: int64 [n + 1]; rep ``i`` is ``blob[offsets[i]:offsets[i + 1]]``.
        blob: the concatenated reps.
        ids_sorted: ``entity_ids`` are in id order. If the rows are also a few runs in
            entity order (one per feature, as ``BlockShard.flush`` writes them), ``chunks``
            slices the runs instead of copying every rep to regroup them.
    """

    entity_ids: list[str]
    entity_idx: np.ndarray
    feature_keys: list[str]
    feature_idx: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    blob: bytes
    ids_sorted: bool = False

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @classmethod
    def from_rows(cls, rows: Sequence[tuple[str, str, int, int, bytes]]) -> BlockBatch:
        """Build from ``(entity_id, feature_key, start, size, rep)`` tuples (tests, adapters)."""
        ents: dict[str, int] = {}
        feats: dict[str, int] = {}
        e_idx = [ents.setdefault(r[0], len(ents)) for r in rows]
        f_idx = [feats.setdefault(r[1], len(feats)) for r in rows]
        lengths = [len(r[4]) for r in rows]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(list(ents), np.asarray(e_idx, np.int64), list(feats),
                   np.asarray(f_idx, np.int64), np.asarray([r[2] for r in rows], np.int64),
                   np.asarray([r[3] for r in rows], np.int64), offsets,
                   b"".join(bytes(r[4]) for r in rows))

    def to_rows(self) -> list[tuple[str, str, int, int, bytes]]:
        """Rows as tuples (slow; adapters for backends without a columnar write)."""
        blob = self.blob
        off = self.offsets.tolist()
        return [
            (self.entity_ids[e], self.feature_keys[f], s, z, bytes(blob[off[i]:off[i + 1]]))
            for i, (e, f, s, z) in enumerate(zip(self.entity_idx.tolist(),
                                                 self.feature_idx.tolist(),
                                                 self.starts.tolist(), self.sizes.tolist()))
        ]

    def chunks(self, max_entities: int) -> Iterator[BlockBatch]:
        """Split into batches of at most ``max_entities`` entities each, in entity-id order.

        A store merges one chunk at a time, so a huge flush never holds all its old and new
        records in memory at once; ordered by id, a chunk is one key range of the store.
        """
        n_ent = len(self.entity_ids)
        if n_ent <= max_entities:
            yield self
            return
        if self.ids_sorted:
            runs = self._sorted_runs()
            if runs is not None:
                yield from self._chunk_slices(max_entities, runs)
                return
        # entities in id order: each chunk is one key range of the store (local writes)
        by_id = np.argsort(np.asarray(self.entity_ids, dtype="U"), kind="stable")
        rank = np.empty(n_ent, dtype=np.int64)
        rank[by_id] = np.arange(n_ent, dtype=np.int64)
        entity_ids = [self.entity_ids[i] for i in by_id.tolist()]
        # rows grouped by chunk, in batch order within one (the merge orders a chunk's rows
        # itself); few chunks: a 16-bit key, which numpy's stable sort radix-sorts in O(n)
        chunk = rank[self.entity_idx] // max_entities
        key = chunk.astype(np.uint16) if n_ent // max_entities < 65_535 else chunk
        order = np.argsort(key, kind="stable")
        lengths = np.diff(self.offsets)[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = _take_rows(self.blob, self.offsets[:-1], np.diff(self.offsets), order)
        ent = rank[self.entity_idx[order]]
        chunk_sorted = chunk[order]
        fid, st, sz = self.feature_idx[order], self.starts[order], self.sizes[order]
        for lo in range(0, n_ent, max_entities):
            hi = min(lo + max_entities, n_ent)
            a, b = np.searchsorted(chunk_sorted, [lo // max_entities,
                                                  lo // max_entities + 1]).tolist()
            off = offsets[a:b + 1]
            yield BlockBatch(entity_ids[lo:hi], ent[a:b] - lo, self.feature_keys,
                             fid[a:b], st[a:b], sz[a:b], off - off[0],
                             blob[int(off[0]):int(off[-1])], ids_sorted=True)

    #: most runs an ``ids_sorted`` batch is sliced by; past it, ``chunks`` regroups by copy
    MAX_RUNS = 256

    def _sorted_runs(self) -> list[tuple[int, int]] | None:
        """The ``[lo, hi)`` row ranges over which ``entity_idx`` never decreases (None if
        there are more than ``MAX_RUNS``)."""
        ent = self.entity_idx
        breaks = np.flatnonzero(ent[1:] < ent[:-1]) + 1
        if len(breaks) >= self.MAX_RUNS:
            return None
        bounds = [0, *breaks.tolist(), len(ent)]
        return list(zip(bounds[:-1], bounds[1:]))

    def _chunk_slices(self, max_entities: int, runs: list[tuple[int, int]]
                      ) -> Iterator[BlockBatch]:
        """``chunks`` of an ``ids_sorted`` batch: each chunk's rows are one slice per run."""
        n_ent = len(self.entity_ids)
        cuts = np.arange(0, n_ent + max_entities, max_entities).clip(max=n_ent)
        rank = np.arange(n_ent, dtype=np.int64)
        for c, spans in enumerate(self._spans(runs, cuts)):
            lo = int(cuts[c])
            yield _join_ranked([(self, spans, rank)], self.entity_ids[lo:int(cuts[c + 1])], lo)

    def _spans(self, runs: list[tuple[int, int]], cuts: np.ndarray
               ) -> list[list[tuple[int, int]]]:
        """For each ``c``, the row ranges (one per run at most) of entities
        ``cuts[c]:cuts[c + 1]``."""
        at = [(lo + np.searchsorted(self.entity_idx[lo:hi], cuts)).tolist() for lo, hi in runs]
        return [[(a[c], a[c + 1]) for a in at if a[c + 1] > a[c]] for c in range(len(cuts) - 1)]

    @classmethod
    def concat(cls, batches: Sequence[BlockBatch]) -> BlockBatch:
        """Concatenate batches, merging their entity and feature dictionaries."""
        if len(batches) == 1:
            return batches[0]
        ents: dict[str, int] = {}
        feats: dict[str, int] = {}
        e_parts, f_parts, st, sz, lens, blobs = [], [], [], [], [], []
        for b in batches:
            if not len(b):
                continue
            emap = np.array([ents.setdefault(e, len(ents)) for e in b.entity_ids], np.int64)
            fmap = np.array([feats.setdefault(f, len(feats)) for f in b.feature_keys], np.int64)
            e_parts.append(emap[b.entity_idx])
            f_parts.append(fmap[b.feature_idx])
            st.append(b.starts)
            sz.append(b.sizes)
            lens.append(np.diff(b.offsets))
            blobs.append(bytes(b.blob[int(b.offsets[0]):int(b.offsets[-1])]))
        if not e_parts:
            return empty_batch()
        lengths = np.concatenate(lens)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(list(ents), np.concatenate(e_parts), list(feats), np.concatenate(f_parts),
                   np.concatenate(st), np.concatenate(sz), offsets, b"".join(blobs))


def empty_batch() -> BlockBatch:
    """A batch with no rows."""
    z = np.zeros(0, np.int64)
    return BlockBatch([], z, [], z.copy(), z.copy(), z.copy(), np.zeros(1, np.int64), b"")


def chunks_by_key(batches: Sequence[BlockBatch], max_entities: int) -> Iterator[BlockBatch]:
    """Split batches of disjoint entities (the shards of one record family) into chunks of at
    most ``max_entities`` entities, each one key range across all of them, in key order.

    A store writing the chunks in order then rewrites each page of records once per call,
    where batch by batch (each shard's entities spread over the whole key range) it would
    rewrite most pages once per batch. Needs ``ids_sorted`` batches in a few runs (as
    ``BlockShard.flush`` makes them); otherwise each batch is chunked on its own.
    """
    batches = [b for b in batches if len(b)]
    runs = [b._sorted_runs() if b.ids_sorted else None for b in batches]
    if len(batches) < 2 or any(r is None for r in runs):
        for b in batches:
            yield from b.chunks(max_entities)
        return
    ids = np.concatenate([np.asarray(b.entity_ids, dtype="U") for b in batches])
    order = np.argsort(ids, kind="stable")
    in_order = ids[order]
    if len(ids) > 1 and bool((in_order[1:] == in_order[:-1]).any()):
        for b in batches:  # one shard flushed twice in one write: keep its batches apart
            yield from b.chunks(max_entities)
        return
    which = np.repeat(np.arange(len(batches)), [len(b.entity_ids) for b in batches])
    # chunk c holds the entities of global ranks [c * max, (c + 1) * max); in a batch,
    # whose ids are in order, they are one range: cut where its entities change chunk
    rank = np.empty(len(ids), dtype=np.int64)
    rank[order] = np.arange(len(ids), dtype=np.int64)
    n_chunks = (len(ids) + max_entities - 1) // max_entities
    parts: list[list[tuple[BlockBatch, list[tuple[int, int]], np.ndarray]]] = [
        [] for _ in range(n_chunks)]
    for k, (b, r) in enumerate(zip(batches, runs)):
        mine = rank[which == k]
        cuts = np.searchsorted(mine // max_entities, np.arange(n_chunks + 1))
        for c, spans in enumerate(b._spans(r, cuts)):
            if spans:  # entity i of the batch is entity mine[i] - c * max of the chunk
                parts[c].append((b, spans, mine))
    for c, pieces in enumerate(parts):
        yield _join_ranked(pieces, in_order[c * max_entities:(c + 1) * max_entities].tolist(),
                           c * max_entities)


def _join_ranked(pieces: list[tuple[BlockBatch, list[tuple[int, int]], np.ndarray]],
                 entity_ids: list[str], first: int) -> BlockBatch:
    """One batch of the rows ``spans`` of each ``(batch, spans, rank)`` (disjoint entities):
    entity ``i`` of a batch becomes entity ``rank[i] - first`` of ``entity_ids``.

    Reps are copied once, straight from each batch's blob."""
    feats: dict[str, int] = {}
    fmaps = [np.array([feats.setdefault(f, len(feats)) for f in b.feature_keys], np.int64)
             for b, _, _ in pieces]
    spans = [(b, a, z) for b, sp, _ in pieces for a, z in sp]

    def pick(column: str) -> np.ndarray:
        return np.concatenate([getattr(b, column)[a:z] for b, a, z in spans])

    lengths = np.concatenate([np.diff(b.offsets[a:z + 1]) for b, a, z in spans])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return BlockBatch(
        entity_ids,
        np.concatenate([pos[b.entity_idx[a:z]] for b, sp, pos in pieces for a, z in sp])
        - first,
        list(feats),
        np.concatenate([m[b.feature_idx[a:z]]
                        for (b, sp, _), m in zip(pieces, fmaps) for a, z in sp]),
        pick("starts"),
        pick("sizes"),
        offsets,
        b"".join(memoryview(b.blob)[b.offsets[a]:b.offsets[z]] for b, a, z in spans),
        ids_sorted=True,
    )


def merge_records(
    old: Sequence[bytes | None],
    batch: BlockBatch,
    keep_after: Mapping[int, int] | None = None,
) -> list[bytes | None]:
    """Return the new record of each ``batch.entity_ids[i]`` given its old record ``old[i]``.

    New rows overwrite old rows with the same ``(feature, size, start)``; blocks of size
    ``s`` whose end is ``<= keep_after[s]`` are dropped if their feature is one of
    ``batch.feature_keys``; a record left empty becomes None. Equivalent to
    ``BlockTable.decode(old).upsert(rows).drop_expired(keep_after, batch.feature_keys)
    .encode()`` per entity.
    """
    n_ent = len(batch.entity_ids)
    scan = _scan_records(old)
    names = set(batch.feature_keys)
    for feats in scan.distinct:
        names.update(feats)
    ordered = sorted(names)
    gid = {k: i for i, k in enumerate(ordered)}

    # New rows already past retention are left out before any sorting or copying.
    live = _unexpired(batch.starts, batch.sizes, keep_after)
    ent_parts = [batch.entity_idx.astype(np.int64)[live]]
    fid_parts = [np.array([gid[k] for k in batch.feature_keys], np.int64)[batch.feature_idx][live]
                 if len(batch) else np.zeros(0, np.int64)]
    st_parts = [batch.starts.astype(np.int64)[live]]
    sz_parts = [batch.sizes.astype(np.int64)[live]]
    src_parts = [batch.offsets[:-1].astype(np.int64)[live]]
    len_parts = [np.diff(batch.offsets).astype(np.int64)[live]]
    head = bytes(batch.blob[: int(batch.offsets[-1])]) if len(batch) else b""
    big = head
    if scan.rows:  # the old records' rows, read with one numpy call per column
        rows = scan.columns(gid, base=len(head))
        ent_parts.append(rows.ent)
        fid_parts.append(rows.fid)
        st_parts.append(rows.starts)
        sz_parts.append(rows.sizes)
        src_parts.append(rows.src)
        len_parts.append(rows.lengths)
        big = head + scan.buffer

    ent = np.concatenate(ent_parts)
    fid = np.concatenate(fid_parts)
    st = np.concatenate(st_parts)
    sz = np.concatenate(sz_parts)
    src = np.concatenate(src_parts)
    lengths = np.concatenate(len_parts)
    # the winner of a (entity, feature, size, start) group sorts first: the last new row;
    # old rows after every new one. Distinct priorities: a permutation of the rows.
    n_new = len(ent_parts[0])
    prio = np.arange(len(ent), dtype=np.int64)
    prio[:n_new] = prio[:n_new][::-1].copy()

    order, first = _record_order(ent, fid, sz, st, prio)
    keep = order[first]
    if keep_after:  # retention drops blocks of the features this batch writes, no others
        written = np.zeros(len(ordered), dtype=bool)
        written[[gid[k] for k in batch.feature_keys]] = True
        f = fid[keep]
        keep = keep[~written[f] | _unexpired_mask(st[keep], sz[keep], keep_after)]
    all_src, all_lengths = src, lengths
    ent, fid, st, sz, src, lengths = (a[keep] for a in (ent, fid, st, sz, src, lengths))

    total = int(lengths.sum())
    out_off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_off[1:])
    if total and np.array_equal(src, out_off[:-1]):
        new_blob = memoryview(big)[:total]  # already in record order (a first write)
    elif total:
        new_blob = _take_rows(big, all_src, all_lengths, keep)
    else:
        new_blob = memoryview(b"")

    bounds = np.searchsorted(ent, np.arange(n_ent + 1))
    m = len(ent)
    # local feature index within each record, for every row at once
    change = np.ones(m, dtype=bool)
    if m:
        change[1:] = (ent[1:] != ent[:-1]) | (fid[1:] != fid[:-1])
    group = np.cumsum(change) - 1
    nonempty = bounds[1:] > bounds[:-1]
    first_group = np.zeros(n_ent, dtype=np.int64)
    first_group[nonempty] = group[bounds[:-1][nonempty]]
    local = (group - first_group[ent]).astype("<i4") if m else np.zeros(0, "<i4")
    rel_off = (out_off[:-1] - out_off[bounds[:-1]][ent]).astype("<u4") if m else np.zeros(0, "<u4")
    ends = out_off[bounds[1:]] - out_off[bounds[:-1]]
    if len(ordered) < 63:
        return _assemble(ordered, bounds, ent, fid[change], np.flatnonzero(change), local, st,
                         sz, rel_off, ends, out_off, new_blob)
    return _assemble_each(ordered, bounds, fid[change], np.flatnonzero(change), local, st, sz,
                          rel_off, ends, out_off, new_blob)


def _assemble(ordered: list[str], bounds: np.ndarray, ent: np.ndarray, used_fids: np.ndarray,
              group_at: np.ndarray, local: np.ndarray, st: np.ndarray, sz: np.ndarray,
              rel_off: np.ndarray, ends: np.ndarray, out_off: np.ndarray, blob: Buffer
              ) -> list[bytes | None]:
    """Cut the merged rows into one ``TBT1`` record per entity, every section at once.

    Each section of every record (header, row count, padding, feature indices, starts,
    sizes, offsets, reps) is an Arrow binary array over one buffer, one value per entity;
    Arrow's element-wise join concatenates them in C. The feature list of a record is a
    bit set (fewer than 63 features), so its header is built once per distinct set.
    """
    n_ent = len(bounds) - 1
    n = np.diff(bounds)
    nonempty = n > 0
    # the feature set of each record: OR of one bit per (entity, feature) group
    bits = np.zeros(n_ent, dtype=np.int64)
    if len(used_fids):
        group_ent = ent[group_at]
        np.bitwise_or.at(bits, group_ent, np.left_shift(1, used_fids))
    sets, set_of = np.unique(bits, return_inverse=True)
    heads = [_header([ordered[i] for i in range(len(ordered)) if int(b) >> i & 1])
             for b in sets.tolist()]
    head_len = np.array([len(h) for h in heads], np.int64)[set_of] + 4
    pad_head = -head_len & 7
    pad_fi = (4 * n) & 4
    rows_at = np.arange(n_ent + 1, dtype=np.int64)
    offsets = np.empty(len(rel_off) + n_ent, dtype="<u4")  # each record's offsets + its end
    offsets[np.arange(len(rel_off)) + ent] = rel_off
    offsets[bounds[1:] + rows_at[:-1]] = ends

    def over(data: Buffer, cuts: np.ndarray) -> pa.Array:
        return pa.LargeBinaryArray.from_buffers(
            pa.large_binary(), n_ent,
            [None, pa.py_buffer(np.ascontiguousarray(cuts, np.int64)), pa.py_buffer(data)])

    pads = pa.array(_PAD, pa.large_binary())
    parts = [
        pa.array(heads, pa.large_binary()).take(pa.array(set_of)),
        over(n.astype("<u4"), 4 * rows_at),
        pads.take(pa.array(pad_head)),
        over(local, 4 * bounds),
        pads.take(pa.array(pad_fi)),
        over(st.astype("<i8"), 8 * bounds),
        over(sz.astype("<i8"), 8 * bounds),
        over(offsets, 4 * (bounds + rows_at)),
        over(blob, out_off[bounds]),
    ]
    joined = pc.binary_join_element_wise(*parts, pa.scalar(b"", pa.large_binary()))
    records: list[bytes | None] = joined.to_pylist()
    for e in np.flatnonzero(~nonempty).tolist():
        records[e] = None
    return records


def _assemble_each(ordered: list[str], bounds: np.ndarray, used_fids: np.ndarray,
                   group_at: np.ndarray, local: np.ndarray, st: np.ndarray, sz: np.ndarray,
                   rel_off: np.ndarray, ends: np.ndarray, out_off: np.ndarray, blob: Buffer
                   ) -> list[bytes | None]:
    """``_assemble`` one record at a time (for 63 features or more: no bit set holds them)."""
    fids = used_fids.tolist()
    used_bounds = np.searchsorted(group_at, bounds).tolist()
    fi_b, st_b = local.tobytes(), st.astype("<i8").tobytes()
    sz_b, off_b = sz.astype("<i8").tobytes(), rel_off.tobytes()
    ends_l, lo_list, starts_off = ends.tolist(), bounds.tolist(), out_off.tolist()
    u32 = _U32.pack
    records: list[bytes | None] = []
    for e in range(len(lo_list) - 1):
        lo, hi = lo_list[e], lo_list[e + 1]
        if lo == hi:
            records.append(None)
            continue
        head = _header([ordered[i] for i in fids[used_bounds[e]:used_bounds[e + 1]]])
        count = hi - lo
        h = head + u32(count)
        fi_len = 4 * count
        records.append(b"".join((
            h, _PAD[_pad8(len(h)) - len(h)],
            fi_b[4 * lo:4 * hi], _PAD[_pad8(fi_len) - fi_len],
            st_b[8 * lo:8 * hi], sz_b[8 * lo:8 * hi],
            off_b[4 * lo:4 * hi], u32(ends_l[e]),
            blob[starts_off[lo]:starts_off[hi]],
        )))
    return records


@dataclass
class _OldColumns:
    """Rows of the old records as columns; ``src`` indexes the merged byte buffer."""

    ent: np.ndarray
    fid: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    src: np.ndarray
    lengths: np.ndarray


@dataclass
class _OldRecords:
    """The old records of a merge, laid end to end (each 8-byte aligned) in ``buffer``.

    Only the headers are parsed in Python (a few steps per record, the feature list once per
    distinct header); every row array is then read for all records at once (``columns``).
    """

    buffer: bytes
    entity: np.ndarray  # int64[r], the batch entity of each record
    base: np.ndarray  # int64[r], where each record starts in ``buffer``
    head_end: np.ndarray  # int64[r], end of the header (the row count's position)
    n: np.ndarray  # int64[r], rows per record
    feature_set: np.ndarray  # int64[r], index into ``distinct``
    distinct: list[tuple[str, ...]]

    @property
    def rows(self) -> int:
        return int(self.n.sum())

    def columns(self, gid: Mapping[str, int], base: int) -> _OldColumns:
        """Every row of every record; feature ids through ``gid``, ``src`` offset by ``base``."""
        n = self.n
        total = int(n.sum())
        rec = np.repeat(np.arange(len(n)), n)
        first_row = np.cumsum(n) - n
        k = np.arange(total, dtype=np.int64) - first_row[rec]
        fi_at = self.base + ((self.head_end + 4 + 7) & ~7)
        starts_at = fi_at + ((4 * n + 7) & ~7)
        sizes_at = starts_at + 8 * n
        offsets_at = sizes_at + 8 * n
        blob_at = offsets_at + 4 * (n + 1)
        i4 = np.frombuffer(self.buffer, "<i4")
        u4 = np.frombuffer(self.buffer, "<u4")
        i8 = np.frombuffer(self.buffer, "<i8")
        local_fid = i4[fi_at[rec] // 4 + k].astype(np.int64)
        off_lo = u4[offsets_at[rec] // 4 + k].astype(np.int64)
        off_hi = u4[offsets_at[rec] // 4 + k + 1].astype(np.int64)
        bad = (local_fid < 0) | (off_hi < off_lo)
        maps = [np.array([gid[f] for f in feats], np.int64) for feats in self.distinct]
        widths = np.array([len(m) for m in maps], np.int64)
        bad |= local_fid >= widths[self.feature_set][rec]
        if bad.any():
            raise CorruptRecordError(
                f"BlockTable of batch entity {int(self.entity[rec[np.argmax(bad)]])} has "
                "feature indices or offsets out of range")
        map_base = np.cumsum(widths) - widths
        fmap = np.concatenate(maps)
        return _OldColumns(
            ent=self.entity[rec],
            fid=fmap[map_base[self.feature_set][rec] + local_fid],
            starts=i8[starts_at[rec] // 8 + k],
            sizes=i8[sizes_at[rec] // 8 + k],
            src=base + blob_at[rec] + off_lo,
            lengths=off_hi - off_lo,
        )


def _scan_records(old: Sequence[bytes | None]) -> _OldRecords:
    """Parse the header of each present, non-empty ``TBT1`` record; lay them end to end.

    Raises:
        CorruptRecordError: a record is not a readable ``TBT1`` record.
    """
    head_size = _HEAD.size
    unpack_head, u16, u32 = _HEAD.unpack_from, _U16.unpack_from, _U32.unpack_from
    # A header's feature section parses the same wherever it appears, so a record whose
    # bytes after the fixed header start with a known section (and whose feature count
    # matches it) has that section's end and features: one dict probe per known length.
    by_length: dict[int, dict[bytes, int]] = {}
    set_nf: list[int] = []
    distinct: list[tuple[str, ...]] = []
    parts: list[bytes] = []
    entity, bases, head_ends, counts, set_ids = [], [], [], [], []
    pos = 0
    for e, rec in enumerate(old):
        if rec is None:
            continue
        size = len(rec)
        try:
            magic, version, nf = unpack_head(rec, 0)
            if magic != MAGIC or version != VERSION:
                raise ValueError
            set_id = -1
            for length, known in by_length.items():
                set_id = known.get(rec[head_size:head_size + length], -1)
                if set_id >= 0 and set_nf[set_id] == nf:
                    end = head_size + length
                    break
                set_id = -1
            if set_id < 0:
                end = head_size
                for _ in range(nf):
                    end += 2 + u16(rec, end)[0]
                section = bytes(rec[head_size:end])
                set_id = len(distinct)
                distinct.append(_parse_features(section, nf))
                set_nf.append(nf)
                by_length.setdefault(end - head_size, {})[section] = set_id
            (n,) = u32(rec, end)
            offsets_at = ((end + 4 + 7) & ~7) + ((4 * n + 7) & ~7) + 16 * n
            if offsets_at + 4 * (n + 1) > size or u32(rec, offsets_at)[0] != 0 or \
                    offsets_at + 4 * (n + 1) + u32(rec, offsets_at + 4 * n)[0] > size:
                raise ValueError
        except (ValueError, struct.error, UnicodeDecodeError):
            BlockTable.decode(rec)  # raises the precise CorruptRecordError
            raise CorruptRecordError(f"BlockTable of batch entity {e} is malformed") from None
        if not n:
            continue
        entity.append(e)
        bases.append(pos)
        head_ends.append(end)
        counts.append(n)
        set_ids.append(set_id)
        parts.append(rec)
        pad = -size & 7
        if pad:
            parts.append(_PAD[pad])
        pos += size + pad
    as_i8 = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    return _OldRecords(b"".join(parts), as_i8(entity), as_i8(bases), as_i8(head_ends),
                       as_i8(counts), as_i8(set_ids), distinct)


def _record_order(ent: np.ndarray, fid: np.ndarray, sz: np.ndarray, st: np.ndarray,
                  prio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (entity, feature, size, start), lowest ``prio`` first among equals;
    and, in that order, whether each row is the first of its (entity, feature, size, start).

    ``prio`` is a permutation of the row numbers. The four keys and ``prio`` are packed into
    one int64 when they fit (they do for any realistic record batch) and sorted as values;
    the order is read back from the packed ``prio``.
    """
    m = len(ent)
    first = np.ones(m, dtype=bool)
    if not m:
        return np.zeros(0, np.int64), first
    sizes, szi = _dense_rank(sz)
    st_rel = st - st.min()
    step = int(np.gcd.reduce(sizes)) if len(sizes) else 1
    if step > 1 and not bool((st_rel % step).any()):
        st_rel //= step  # block starts are multiples of their sizes: count in steps
    widths = [int(ent.max()).bit_length(), int(fid.max()).bit_length(),
              int(len(sizes) - 1).bit_length(), int(st_rel.max()).bit_length()]
    if sum(widths) <= 62:
        key = ent.copy()
        for part, width in zip((fid, szi.astype(np.int64), st_rel), widths[1:]):
            key <<= width
            key |= part
        prio_bits = max(int(m - 1).bit_length(), 1)
        if sum(widths) + prio_bits <= 62:  # the tie-break packed too: a sort of values
            key <<= prio_bits
            key |= prio
            key.sort(kind="stable")  # timsort: the rows come in a few sorted runs
            row_of = np.empty(m, dtype=np.int64)
            row_of[prio] = np.arange(m, dtype=np.int64)
            order = row_of[key & ((1 << prio_bits) - 1)]
            k = key >> prio_bits
        else:
            order = np.lexsort((prio, key))
            k = key[order]
        first[1:] = k[1:] != k[:-1]
        return order, first
    order = np.lexsort((prio, st, sz, fid, ent))
    e, f, z, t = ent[order], fid[order], sz[order], st[order]
    first[1:] = (e[1:] != e[:-1]) | (f[1:] != f[:-1]) | (z[1:] != z[:-1]) | (t[1:] != t[:-1])
    return order, first


def _dense_rank(values: np.ndarray, few: int = 16) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` without sorting all values when few differ.

    Block sizes take a handful of values: finding them by repeated ``min`` and ranking with
    a binary search over them is linear, where ``np.unique`` sorts every row.
    """
    distinct: list[int] = []
    rest = values
    while len(rest) and len(distinct) < few:
        low = rest.min()
        distinct.append(int(low))
        rest = rest[rest != low]
    if len(rest):
        return np.unique(values, return_inverse=True)
    uniq = np.asarray(distinct, dtype=values.dtype)
    return uniq, np.searchsorted(uniq, values)


def _unexpired(starts: np.ndarray, sizes: np.ndarray,
               keep_after: Mapping[int, int] | None) -> slice | np.ndarray:
    """Rows whose block ends after ``keep_after[size]`` (all rows: a full slice)."""
    if not keep_after or not len(starts):
        return slice(None)
    return np.flatnonzero(_unexpired_mask(starts, sizes, keep_after))


def _unexpired_mask(starts: np.ndarray, sizes: np.ndarray,
                    keep_after: Mapping[int, int]) -> np.ndarray:
    """Whether each block ends after ``keep_after[size]`` (sizes not listed: kept)."""
    limit = np.full(len(starts), np.iinfo(np.int64).min, dtype=np.int64)
    for size, ts in keep_after.items():
        limit[sizes == size] = ts
    return (starts + sizes) > limit


_PAD = [bytes(i) for i in range(8)]


def _take_rows(data: bytes, src: np.ndarray, lengths: np.ndarray, rows: np.ndarray
               ) -> memoryview:
    """Concatenate ``data[src[i]:src[i] + lengths[i]]`` for ``i`` in ``rows``, in that order.

    The ranges must be sorted and disjoint (``src[i] + lengths[i] <= src[i + 1]``). They,
    with the gaps between them, tile ``data``; Arrow's ``take`` on that tiling (a binary
    array over ``data``, no copy) copies every range in C, however many there are.
    """
    m = len(src)
    tiling = np.empty(2 * m + 2, dtype=np.int64)  # gap, range 0, gap, range 1, ..., gap
    tiling[0] = 0
    tiling[1:-1:2] = src
    tiling[2:-1:2] = src + lengths
    tiling[-1] = len(data)
    values = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), 2 * m + 1, [None, pa.py_buffer(tiling), pa.py_buffer(data)])
    taken = values.take(pa.array(2 * np.asarray(rows, np.int64) + 1))
    offsets = np.frombuffer(taken.buffers()[1], np.int64, len(taken) + 1, 8 * taken.offset)
    return memoryview(taken.buffers()[2])[int(offsets[0]):int(offsets[-1])]


def _header(features: list[str]) -> bytes:
    head = bytearray(_HEAD.pack(MAGIC, VERSION, len(features)))
    for key in features:
        raw = key.encode("utf-8")
        head += _U16.pack(len(raw)) + raw
    return bytes(head)
