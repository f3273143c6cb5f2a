"""All blocks of one (entity, family) record as parallel numpy arrays, with a zero-copy codec.

A ``BlockTable`` is what the online store keeps per entity and family and what readers get
back: rows sorted by ``(feature_idx, size, start)``, reps concatenated in ``blob`` and
delimited by ``offsets`` (row ``i`` is ``blob[offsets[i]:offsets[i + 1]]``). Reps are opaque
bytes here; an aggregation turns ``(blob, offsets[lo:hi + 1])`` into arrays itself.

Wire layout of ``encode()`` (little endian), every numpy array 8-byte aligned::

    b"TBT1" | uint32 version | uint32 n_features
    n_features x (uint16 len | utf8 feature key)
    uint32 n_rows | pad to 8
    int32[n] feature_idx | pad to 8
    int64[n] starts | int64[n] sizes
    uint32[n + 1] offsets
    blob (offsets[n] bytes)

``decode()`` parses the header in Python (one step per feature, never per row) and maps the
arrays with ``np.frombuffer``: the table shares memory with the buffer it was decoded from.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from features.store.errors import CorruptRecordError, StoreError

MAGIC = b"TBT1"
VERSION = 1
_HEAD = struct.Struct("<4sII")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_MAX_BLOB = 2**32 - 1
_I4, _I8, _U4 = np.dtype("<i4"), np.dtype("<i8"), np.dtype("<u4")
# Records of one family repeat the same feature keys: memoize their parsed header section.
_FEATURES_CACHE: dict[bytes, tuple[str, ...]] = {}

Buffer = bytes | bytearray | memoryview


def _pad8(n: int) -> int:
    return (n + 7) & ~7


class FeatureBlocks(NamedTuple):
    """The rows of one feature: ``starts``/``sizes`` (n), ``offsets`` (n + 1, into ``blob``)."""

    starts: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    blob: Buffer


@dataclass(frozen=True, eq=False)
class BlockTable:
    """Blocks of one record, sorted by ``(feature_idx, size, start)``; immutable.

    Attributes:
        features: feature keys (``name@version``) of this record, sorted, unique.
        feature_idx: int32[n], index into ``features`` of each row.
        starts: int64[n], block start (epoch ms).
        sizes: int64[n], block size (ms).
        offsets: uint32[n + 1], rep ``i`` is ``blob[offsets[i]:offsets[i + 1]]``.
        blob: the concatenated reps (bytes, or a memoryview into a decoded buffer).
    """

    features: tuple[str, ...]
    feature_idx: np.ndarray
    starts: np.ndarray
    sizes: np.ndarray
    offsets: np.ndarray
    blob: Buffer

    # ------------------------------------------------------------------ construction

    @classmethod
    def empty(cls) -> BlockTable:
        """Return a table with no rows."""
        return cls(
            features=(),
            feature_idx=np.zeros(0, np.int32),
            starts=np.zeros(0, np.int64),
            sizes=np.zeros(0, np.int64),
            offsets=np.zeros(1, np.uint32),
            blob=b"",
        )

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, int, int, bytes]]) -> BlockTable:
        """Build a table from ``(feature_key, start, size, rep)`` rows; later duplicates win."""
        return cls.empty().upsert(rows)

    @classmethod
    def from_arrays(
        cls,
        feature_keys: Iterable[str],
        starts: np.ndarray,
        sizes: np.ndarray,
        reps: list[bytes],
    ) -> BlockTable:
        """Build a table from unsorted parallel columns; later duplicates win."""
        return cls.empty()._merge(list(feature_keys), starts, sizes, reps)

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    @property
    def ends(self) -> np.ndarray:
        """int64[n], block end (exclusive) of each row."""
        return self.starts + self.sizes

    def rep(self, i: int) -> bytes:
        """Return the rep bytes of row ``i``."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"row {i} out of range for a BlockTable of {n} rows")
        i %= n
        return bytes(self.blob[int(self.offsets[i]) : int(self.offsets[i + 1])])

    def slice_for(self, feature_key: str) -> tuple[int, int]:
        """Return ``(lo, hi)``: the contiguous rows of ``feature_key`` (``lo == hi`` if none)."""
        try:
            idx = self.features.index(feature_key)
        except ValueError:
            return (0, 0)
        lo, hi = np.searchsorted(self.feature_idx, [idx, idx + 1])
        return int(lo), int(hi)

    def feature_blocks(self, feature_key: str) -> FeatureBlocks:
        """Return the rows of one feature as array views (sorted by size, then start)."""
        lo, hi = self.slice_for(feature_key)
        return FeatureBlocks(
            self.starts[lo:hi], self.sizes[lo:hi], self.offsets[lo : hi + 1], self.blob
        )

    def to_rows(self) -> list[tuple[str, int, int, bytes]]:
        """Return every row as ``(feature_key, start, size, rep)`` (slow; tests and debugging)."""
        return [
            (self.features[int(f)], int(s), int(z), self.rep(i))
            for i, (f, s, z) in enumerate(zip(self.feature_idx, self.starts, self.sizes))
        ]

    def equals(self, other: BlockTable) -> bool:
        """Return whether both tables hold the same rows (feature keys, starts, sizes, reps)."""
        if len(self) != len(other):
            return False
        mine = [self.features[i] for i in self.feature_idx.tolist()]
        theirs = [other.features[i] for i in other.feature_idx.tolist()]
        return (
            mine == theirs
            and np.array_equal(self.starts, other.starts)
            and np.array_equal(self.sizes, other.sizes)
            and np.array_equal(np.diff(self.offsets), np.diff(other.offsets))
            and bytes(self.blob[: int(self.offsets[-1])])
            == bytes(other.blob[: int(other.offsets[-1])])
        )

    # ------------------------------------------------------------------ updating

    def upsert(self, rows: Iterable[tuple[str, int, int, bytes]]) -> BlockTable:
        """Return a table with ``rows`` written over this one.

        A row overwrites the row of the same ``(feature_key, size, start)``; within ``rows``
        the last one wins. Rows are never combined: the writer sends each block's full rep.
        """
        keys: list[str] = []
        starts: list[int] = []
        sizes: list[int] = []
        reps: list[bytes] = []
        for key, start, size, rep in rows:
            keys.append(key)
            starts.append(start)
            sizes.append(size)
            reps.append(rep)
        if not keys:
            return self
        return self._merge(keys, np.asarray(starts, np.int64), np.asarray(sizes, np.int64), reps)

    def drop_expired(self, keep_after: Mapping[int, int],
                     features: Collection[str] | None = None) -> BlockTable:
        """Return a table without blocks of size ``s`` whose end is ``<= keep_after[s]``.

        Sizes missing from ``keep_after`` are kept (per-size retention; see
        ``features.tiling.retention``). With ``features``, only those features' blocks are
        considered: a writer never drops blocks of features it does not write.
        """
        if not keep_after or len(self) == 0:
            return self
        limit = np.full(len(self), np.iinfo(np.int64).min, dtype=np.int64)
        for size, ts in keep_after.items():
            limit[self.sizes == size] = ts
        if features is not None:
            mine = np.array([k in features for k in self.features] + [False], dtype=bool)
            limit[~mine[self.feature_idx]] = np.iinfo(np.int64).min
        keep = np.flatnonzero(self.ends > limit)
        if keep.shape[0] == len(self):
            return self
        return self._take(keep)

    def drop_before(self, ts: int) -> BlockTable:
        """Return a table without the blocks whose end is ``<= ts`` (retention)."""
        keep = np.flatnonzero(self.ends > ts)
        if keep.shape[0] == len(self):
            return self
        return self._take(keep)

    def _merge(
        self, keys: list[str], starts: np.ndarray, sizes: np.ndarray, reps: list[bytes]
    ) -> BlockTable:
        for key in set(keys).difference(self.features):
            if not isinstance(key, str) or not key:
                raise StoreError(f"feature key must be a non-empty str, got {key!r}")
        if sizes.shape[0] and int(sizes.min()) <= 0:
            bad = int(sizes[np.argmin(sizes)])
            raise StoreError(f"block size must be a positive number of ms, got {bad}")
        features = tuple(sorted(set(self.features).union(keys)))
        pos = {f: i for i, f in enumerate(features)}
        remap = np.fromiter((pos[f] for f in self.features), np.int32, len(self.features))
        new_fi = np.fromiter((pos[k] for k in keys), np.int32, len(keys))
        new_lengths = np.fromiter((len(r) for r in reps), np.int64, len(reps))

        n_old = len(self)
        fi = np.concatenate([remap[self.feature_idx] if n_old else self.feature_idx, new_fi])
        st = np.concatenate([self.starts, np.asarray(starts, np.int64)])
        sz = np.concatenate([self.sizes, np.asarray(sizes, np.int64)])
        old_end = int(self.offsets[-1])
        src_starts = np.concatenate(
            [self.offsets[:-1].astype(np.int64), old_end + np.cumsum(new_lengths) - new_lengths]
        )
        lengths = np.concatenate([np.diff(self.offsets).astype(np.int64), new_lengths])
        src = np.concatenate(
            [
                np.frombuffer(self.blob, np.uint8, old_end),
                np.frombuffer(b"".join(reps), np.uint8),
            ]
        )

        # Stable sort: old rows precede new ones, new ones keep input order, so the last row
        # of each (feature, size, start) group is the one that wins.
        order = np.lexsort((st, sz, fi))
        fi, st, sz = fi[order], st[order], sz[order]
        last = np.ones(order.shape[0], bool)
        last[:-1] = (fi[1:] != fi[:-1]) | (sz[1:] != sz[:-1]) | (st[1:] != st[:-1])
        order = order[last]
        return _gather(
            features, fi[last], st[last], sz[last], src, src_starts[order], lengths[order]
        )

    def _take(self, rows: np.ndarray) -> BlockTable:
        used = np.unique(self.feature_idx[rows])
        remap = np.full(len(self.features), -1, np.int32)
        remap[used] = np.arange(used.shape[0], dtype=np.int32)
        end = int(self.offsets[-1])
        return _gather(
            tuple(self.features[i] for i in used.tolist()),
            remap[self.feature_idx[rows]],
            self.starts[rows],
            self.sizes[rows],
            np.frombuffer(self.blob, np.uint8, end),
            self.offsets[:-1][rows].astype(np.int64),
            np.diff(self.offsets)[rows].astype(np.int64),
        )

    # ------------------------------------------------------------------ codec

    def encode(self) -> bytes:
        """Serialize to the ``TBT1`` layout (see the module docstring)."""
        n = len(self)
        head = bytearray(_HEAD.pack(MAGIC, VERSION, len(self.features)))
        for key in self.features:
            raw = key.encode("utf-8")
            if len(raw) > 0xFFFF:
                raise StoreError(
                    f"feature key is {len(raw)} bytes; the limit is 65535: {key[:80]!r}..."
                )
            head += _U16.pack(len(raw)) + raw
        head += _U32.pack(n)
        head += bytes(_pad8(len(head)) - len(head))
        fi = self.feature_idx.astype("<i4", copy=False).tobytes()
        parts = [
            bytes(head),
            fi,
            bytes(_pad8(len(fi)) - len(fi)),
            self.starts.astype("<i8", copy=False).tobytes(),
            self.sizes.astype("<i8", copy=False).tobytes(),
            self.offsets.astype("<u4", copy=False).tobytes(),
            bytes(self.blob[: int(self.offsets[-1])]),
        ]
        return b"".join(parts)

    @classmethod
    def decode(cls, buf: Buffer, *, validate: bool = False) -> BlockTable:
        """Map an ``encode()``d buffer into a table without copying the arrays or the blob.

        The table keeps a reference to ``buf``; do not mutate ``buf`` afterwards.

        Args:
            buf: the encoded bytes.
            validate: also check row order, feature indices and offsets (O(n), vectorized);
                off on the hot path, where only the header and the lengths are checked.

        Raises:
            CorruptRecordError: bad magic, unknown version, truncated buffer or bad offsets.
        """
        view = memoryview(buf).cast("B") if not isinstance(buf, bytes) else buf
        size = len(view)
        if size < _HEAD.size:
            raise CorruptRecordError(
                f"BlockTable buffer is truncated: {size} bytes, the header alone needs {_HEAD.size}"
            )
        magic, version, n_features = _HEAD.unpack_from(view, 0)
        if magic != MAGIC:
            raise CorruptRecordError(
                f"not a BlockTable: magic is {bytes(magic)!r}, expected {MAGIC!r}"
            )
        if version != VERSION:
            raise CorruptRecordError(
                f"BlockTable version {version} is not supported (this code reads {VERSION}); "
                "upgrade tessera or rewrite the store"
            )
        pos = _HEAD.size
        try:
            for _ in range(n_features):
                (klen,) = _U16.unpack_from(view, pos)
                pos += 2 + klen
            if pos > size:
                raise struct.error("feature keys")
            section = bytes(view[_HEAD.size : pos])
            features = _FEATURES_CACHE.get(section)
            if features is None:
                features = _parse_features(section, n_features)
                if len(_FEATURES_CACHE) >= 4096:
                    _FEATURES_CACHE.clear()
                _FEATURES_CACHE[section] = features
            (n,) = _U32.unpack_from(view, pos)
        except (struct.error, UnicodeDecodeError) as exc:
            raise CorruptRecordError(
                f"BlockTable header is truncated or malformed at byte {pos} of {size}"
            ) from exc
        pos = _pad8(pos + 4)
        fi_at = pos
        starts_at = _pad8(fi_at + 4 * n)
        sizes_at = starts_at + 8 * n
        offsets_at = sizes_at + 8 * n
        blob_at = offsets_at + 4 * (n + 1)
        if blob_at > size:
            raise CorruptRecordError(
                f"BlockTable is truncated: {n} rows need {blob_at} bytes before the blob, "
                f"the buffer has {size}"
            )
        (first,) = _U32.unpack_from(view, offsets_at)
        (blob_len,) = _U32.unpack_from(view, offsets_at + 4 * n)
        if first != 0 or blob_at + blob_len > size:
            raise CorruptRecordError(
                f"BlockTable is truncated: the blob needs {blob_len} bytes at {blob_at}, "
                f"the buffer has {size} (first offset {first})"
            )
        times = np.frombuffer(view, _I8, 2 * n, starts_at)  # starts then sizes: one call
        # Same as cls(...), without the frozen dataclass's per-field __setattr__ (hot path).
        table = object.__new__(cls)
        table.__dict__.update(
            features=features,
            feature_idx=np.frombuffer(view, _I4, n, fi_at),
            starts=times[:n],
            sizes=times[n:],
            offsets=np.frombuffer(view, _U4, n + 1, offsets_at),
            blob=memoryview(view)[blob_at : blob_at + blob_len],
        )
        if validate:
            table.check()
        return table

    def check(self) -> None:
        """Raise ``CorruptRecordError`` unless the invariants hold (sorted, in range, offsets)."""
        n = len(self)
        if not (
            self.feature_idx.shape == self.sizes.shape == (n,) and self.offsets.shape == (n + 1,)
        ):
            raise CorruptRecordError("BlockTable arrays have inconsistent lengths")
        if n and (self.feature_idx.min() < 0 or self.feature_idx.max() >= len(self.features)):
            raise CorruptRecordError("BlockTable feature_idx out of range")
        if np.any(np.diff(self.offsets.astype(np.int64)) < 0) or int(self.offsets[-1]) > len(
            self.blob
        ):
            raise CorruptRecordError("BlockTable offsets are not increasing or exceed the blob")
        if n > 1:
            fi, sz, st = self.feature_idx, self.sizes, self.starts
            gt = (fi[1:] > fi[:-1]) | (
                (fi[1:] == fi[:-1])
                & ((sz[1:] > sz[:-1]) | ((sz[1:] == sz[:-1]) & (st[1:] > st[:-1])))
            )
            if not np.all(gt):
                raise CorruptRecordError(
                    "BlockTable rows are not strictly sorted by (feature, size, start)"
                )


def _parse_features(section: bytes, n_features: int) -> tuple[str, ...]:
    features = []
    pos = 0
    for _ in range(n_features):
        (klen,) = _U16.unpack_from(section, pos)
        features.append(section[pos + 2 : pos + 2 + klen].decode("utf-8"))
        pos += 2 + klen
    return tuple(features)


def _gather(
    features: tuple[str, ...],
    feature_idx: np.ndarray,
    starts: np.ndarray,
    sizes: np.ndarray,
    src: np.ndarray,
    src_starts: np.ndarray,
    lengths: np.ndarray,
) -> BlockTable:
    """Build a table whose rep ``i`` is ``src[src_starts[i]:src_starts[i] + lengths[i]]``."""
    offsets = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    total = int(offsets[-1])
    if total > _MAX_BLOB:
        raise StoreError(
            f"a BlockTable record holds at most {_MAX_BLOB} bytes of reps, this one would hold "
            f"{total}; use larger block sizes or shorter retention"
        )
    if total:
        # Byte i of the output comes from src[i - offsets[row] + src_starts[row]].
        shift = np.repeat(src_starts - offsets[:-1], lengths)
        blob = src[shift + np.arange(total)].tobytes()
    else:
        blob = b""
    return BlockTable(
        features=features,
        feature_idx=np.ascontiguousarray(feature_idx, np.int32),
        starts=np.ascontiguousarray(starts, np.int64),
        sizes=np.ascontiguousarray(sizes, np.int64),
        offsets=offsets.astype(np.uint32),
        blob=blob,
    )
