"""Block rows of many entities as columns, and the vectorized merge into their records.

The streaming flow hands the store thousands of changed blocks per flush. Merging them
entity by entity (decode, upsert, encode) costs a Python round of numpy calls per entity;
``merge_records`` instead decodes every affected record into one set of columns, merges and
deduplicates all of them with one ``lexsort``, applies per-size retention, gathers the reps
in one indexed copy, and only then cuts the result back into one ``TBT1`` record per entity.
The records it writes are byte-compatible with ``BlockTable.encode``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from features.store.blocktable import _HEAD, _U16, _U32, MAGIC, VERSION, BlockTable, _pad8

_HEADER_CACHE: dict[tuple[str, ...], bytes] = {}


@dataclass
class BlockBatch:
    """Block rows ``(entity, feature, start, size, rep)`` of many entities, as columns.

    Attributes:
        entity_ids: distinct entity ids; ``entity_idx`` indexes into it.
        feature_keys: distinct feature keys; ``feature_idx`` indexes into it.
        starts, sizes: int64 per row.
        offsets: int64 [n + 1]; rep ``i`` is ``blob[offsets[i]:offsets[i + 1]]``.
        blob: the concatenated reps.
    """

    entity_ids: list[str]
    entity_idx: np.ndarray
    feature_keys: list[str]
    feature_idx: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    blob: bytes

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
        """Split into batches of at most ``max_entities`` entities each (rows regrouped).

        A store writes each chunk in its own transaction, so a huge flush never holds all its
        records (and their dirty pages) in memory at once.
        """
        n_ent = len(self.entity_ids)
        if n_ent <= max_entities:
            yield self
            return
        order = np.argsort(self.entity_idx, kind="stable")
        lengths = np.diff(self.offsets)[order]
        offsets = np.zeros(len(order) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        blob = _gather_bytes(bytes(self.blob), self.offsets[:-1][order], lengths)
        ent = self.entity_idx[order]
        fid, st, sz = self.feature_idx[order], self.starts[order], self.sizes[order]
        for lo in range(0, n_ent, max_entities):
            hi = min(lo + max_entities, n_ent)
            a, b = np.searchsorted(ent, [lo, hi]).tolist()
            off = offsets[a:b + 1]
            yield BlockBatch(self.entity_ids[lo:hi], ent[a:b] - lo, self.feature_keys,
                             fid[a:b], st[a:b], sz[a:b], off - off[0],
                             blob[int(off[0]):int(off[-1])])

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
    tables = [BlockTable.decode(r) if r is not None else None for r in old]
    names = set(batch.feature_keys)
    for t in tables:
        if t is not None:
            names.update(t.features)
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
    # the winner of a (entity, feature, size, start) group sorts first: the last new row
    prio_parts = [np.arange(len(batch) - 1, -1, -1, dtype=np.int64)[live]]
    blobs = [bytes(batch.blob[: int(batch.offsets[-1])]) if len(batch) else b""]
    # The old records' rows, gathered with one numpy call per column (not per record).
    olds = [(e, t) for e, t in enumerate(tables) if t is not None and len(t)]
    if olds:
        counts = np.array([len(t) for _, t in olds], np.int64)
        fmaps = [[gid[k] for k in t.features] for _, t in olds]
        fmap_base = np.cumsum([0] + [len(f) for f in fmaps[:-1]])
        fmap_all = np.array([g for f in fmaps for g in f], np.int64)
        fidx = np.concatenate([t.feature_idx for _, t in olds]).astype(np.int64)
        ent_parts.append(np.repeat(np.array([e for e, _ in olds], np.int64), counts))
        fid_parts.append(fmap_all[fidx + np.repeat(fmap_base, counts)])
        st_parts.append(np.concatenate([t.starts for _, t in olds]))
        sz_parts.append(np.concatenate([t.sizes for _, t in olds]))
        # offsets: n + 1 per record; a row's length is the next offset minus its own
        offs = np.concatenate([t.offsets for _, t in olds]).astype(np.int64)
        row_pos = np.arange(len(offs) - 1)
        not_last = np.ones(len(offs) - 1, dtype=bool)
        not_last[np.cumsum(counts + 1)[:-1] - 1] = False  # each record's closing offset
        row_pos = row_pos[not_last]
        ends = offs[np.cumsum(counts + 1) - 1]  # bytes used by each record's reps
        rec_base = len(blobs[0]) + np.concatenate([[0], np.cumsum(ends)[:-1]])
        src_parts.append(offs[row_pos] + np.repeat(rec_base, counts))
        len_parts.append(offs[row_pos + 1] - offs[row_pos])
        prio_parts.append(np.full(int(counts.sum()), len(batch), np.int64))
        blobs.extend(t.blob[:end] for (_, t), end in zip(olds, ends.tolist()))

    ent = np.concatenate(ent_parts)
    fid = np.concatenate(fid_parts)
    st = np.concatenate(st_parts)
    sz = np.concatenate(sz_parts)
    src = np.concatenate(src_parts)
    lengths = np.concatenate(len_parts)
    prio = np.concatenate(prio_parts)
    big = b"".join(blobs)

    order, first = _record_order(ent, fid, sz, st, prio)
    keep = order[first]
    if keep_after:  # retention drops blocks of the features this batch writes, no others
        written = np.zeros(len(ordered), dtype=bool)
        written[[gid[k] for k in batch.feature_keys]] = True
        f = fid[keep]
        keep = keep[~written[f] | _unexpired_mask(st[keep], sz[keep], keep_after)]
    ent, fid, st, sz, src, lengths = (a[keep] for a in (ent, fid, st, sz, src, lengths))

    total = int(lengths.sum())
    out_off = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out_off[1:])
    if total and np.array_equal(src, out_off[:-1]):
        new_blob = big[:total]  # already in record order (a first write): no gather
    elif total:
        new_blob = _gather_bytes(big, src, lengths)
    else:
        new_blob = b""

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
    used_fids = fid[change].tolist()
    used_bounds = np.searchsorted(np.flatnonzero(change), bounds).tolist()
    rel_off = (out_off[:-1] - out_off[bounds[:-1]][ent]).astype("<u4") if m else np.zeros(0, "<u4")
    fi_b, st_b = local.tobytes(), st.astype("<i8").tobytes()
    sz_b, off_b = sz.astype("<i8").tobytes(), rel_off.tobytes()
    ends = (out_off[bounds[1:]] - out_off[bounds[:-1]]).tolist()
    lo_list, starts_off = bounds.tolist(), out_off.tolist()
    u32 = _U32.pack
    records: list[bytes | None] = []
    for e in range(n_ent):
        lo, hi = lo_list[e], lo_list[e + 1]
        if lo == hi:
            records.append(None)
            continue
        key = tuple([ordered[i] for i in used_fids[used_bounds[e]:used_bounds[e + 1]]])
        head = _HEADER_CACHE.get(key)
        if head is None:
            head = _header(list(key))
            if len(_HEADER_CACHE) > 4096:
                _HEADER_CACHE.clear()
            _HEADER_CACHE[key] = head
        n = hi - lo
        h = head + u32(n)
        fi_len = 4 * n
        records.append(b"".join((
            h, _PAD[_pad8(len(h)) - len(h)],
            fi_b[4 * lo:4 * hi], _PAD[_pad8(fi_len) - fi_len],
            st_b[8 * lo:8 * hi], sz_b[8 * lo:8 * hi],
            off_b[4 * lo:4 * hi], u32(ends[e]),
            new_blob[starts_off[lo]:starts_off[hi]],
        )))
    return records


def _record_order(ent: np.ndarray, fid: np.ndarray, sz: np.ndarray, st: np.ndarray,
                  prio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows sorted by (entity, feature, size, start), lowest ``prio`` first among equals;
    and, in that order, whether each row is the first of its (entity, feature, size, start).

    The four keys are packed into one int64 when they fit (they do for any realistic
    record batch), so the sort is over two keys, not five.
    """
    m = len(ent)
    first = np.ones(m, dtype=bool)
    if not m:
        return np.zeros(0, np.int64), first
    sizes, szi = np.unique(sz, return_inverse=True)
    st_rel = st - st.min()
    widths = [int(ent.max()).bit_length(), int(fid.max()).bit_length(),
              int(len(sizes) - 1).bit_length(), int(st_rel.max()).bit_length()]
    if sum(widths) <= 62:
        key = ent.copy()
        for part, width in zip((fid, szi.astype(np.int64), st_rel), widths[1:]):
            key <<= width
            key |= part
        order = np.lexsort((prio, key))
        k = key[order]
        first[1:] = k[1:] != k[:-1]
        return order, first
    order = np.lexsort((prio, st, sz, fid, ent))
    e, f, z, t = ent[order], fid[order], sz[order], st[order]
    first[1:] = (e[1:] != e[:-1]) | (f[1:] != f[:-1]) | (z[1:] != z[:-1]) | (t[1:] != t[:-1])
    return order, first


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


def _gather_bytes(big: bytes, src: np.ndarray, lengths: np.ndarray) -> bytes:
    """Concatenate ``big[src[i]:src[i] + lengths[i]]`` over rows.

    Rows that continue where the previous one ended are copied as one run (a rewritten
    record is mostly its old bytes in order), and each run is one bytes slice: a C-level
    copy per run, not an index entry per byte.
    """
    m = len(src)
    if not m:
        return b""
    ends = src + lengths
    first = np.ones(m, dtype=bool)
    first[1:] = src[1:] != ends[:-1]
    heads = np.flatnonzero(first)
    tails = np.append(heads[1:] - 1, m - 1)
    return b"".join([big[a:b] for a, b in zip(src[heads].tolist(), ends[tails].tolist())])


def _header(features: list[str]) -> bytes:
    head = bytearray(_HEAD.pack(MAGIC, VERSION, len(features)))
    for key in features:
        raw = key.encode("utf-8")
        head += _U16.pack(len(raw)) + raw
    return bytes(head)
