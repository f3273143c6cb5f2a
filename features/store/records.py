"""Compact byte codecs of sequence and value records, shared by the store backends.

Sequence record (``TSQ1``)::

    b"TSQ1" | uint32 n | int64[n] ts | int64[n] dwell_ms
    3 x (uint32[n + 1] offsets | utf8 blob), for event_id, item_id, action

Value record (``TVR1``)::

    b"TVR1" | uint32 columns_id | uint32 n | pad to 8 (int32 0) | int64 watermark | float32[n]

``columns_id`` is ``crc32`` of the column list; the list itself lives in store metadata,
so a reader maps rows written under an older list by column name.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Sequence
from itertools import pairwise

import numpy as np

from features.store.base import NO_WATERMARK, ActionSequence, ValuesResult, _objects
from features.store.errors import CorruptRecordError, StoreError

_SEQ_MAGIC = b"TSQ1"
_SEQ_HEAD = struct.Struct("<4sI")
_VAL_MAGIC = b"TVR1"
_VAL_HEAD = struct.Struct("<4sIIiq")


# ---------------------------------------------------------------------- sequences


def _encode_strings(values) -> bytes:
    raws = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(raws) + 1, np.int64)
    offsets[1:] = np.cumsum([len(r) for r in raws], dtype=np.int64)
    return offsets.astype("<u4").tobytes() + b"".join(raws)


def encode_sequence(seq: ActionSequence) -> bytes:
    """Serialize a sequence to the ``TSQ1`` layout."""
    n = len(seq)
    return b"".join(
        [
            _SEQ_HEAD.pack(_SEQ_MAGIC, n),
            seq.ts.astype("<i8").tobytes(),
            seq.dwell_ms.astype("<i8").tobytes(),
            _encode_strings(seq.event_ids),
            _encode_strings(seq.item_ids),
            _encode_strings(seq.actions),
        ]
    )


def decode_sequence(buf: bytes) -> ActionSequence:
    """Parse a ``TSQ1`` record.

    Raises:
        CorruptRecordError: bad magic or truncated record.
    """
    try:
        magic, n = _SEQ_HEAD.unpack_from(buf, 0)
        if magic != _SEQ_MAGIC:
            raise CorruptRecordError(
                f"not a sequence record: magic {magic!r}, expected {_SEQ_MAGIC!r}"
            )
        pos = _SEQ_HEAD.size
        ts = np.frombuffer(buf, "<i8", n, pos).astype(np.int64)
        dwell = np.frombuffer(buf, "<i8", n, pos + 8 * n).astype(np.int64)
        pos += 16 * n
        columns = []
        for _ in range(3):
            offsets = np.frombuffer(buf, "<u4", n + 1, pos).tolist()
            pos += 4 * (n + 1)
            end = pos + offsets[-1]
            if end > len(buf):
                raise ValueError("string blob truncated")
            text = buf[pos:end]
            columns.append(_objects([text[a:b].decode("utf-8") for a, b in pairwise(offsets)]))
            pos = end
    except CorruptRecordError:
        raise
    except (ValueError, struct.error, UnicodeDecodeError) as exc:
        raise CorruptRecordError(
            f"sequence record is truncated or malformed ({len(buf)} bytes)"
        ) from exc
    event_ids, item_ids, actions = columns
    return ActionSequence(
        ts=ts, item_ids=item_ids, actions=actions, dwell_ms=dwell, event_ids=event_ids
    )


# ---------------------------------------------------------------------- values


def columns_id(columns: Sequence[str]) -> int:
    """Return the id of a column list: ``crc32`` of its JSON."""
    return zlib.crc32(json.dumps(list(columns)).encode("utf-8"))


def encode_value(values: np.ndarray, watermark: int, cols_id: int, n_cols: int) -> bytes:
    """Serialize one value row; raise ``StoreError`` if ``values`` does not have ``n_cols``."""
    vec = np.asarray(values, dtype="<f4").reshape(-1)
    if vec.shape[0] != n_cols:
        raise StoreError(
            f"a value row has {vec.shape[0]} entries but {n_cols} columns were given; "
            "pass one float per column, in column order"
        )
    return _VAL_HEAD.pack(_VAL_MAGIC, cols_id, n_cols, 0, int(watermark)) + vec.tobytes()


def decode_values(
    records: list[bytes | None],
    current: tuple[str, ...],
    column_lists: dict[int, tuple[str, ...]],
) -> ValuesResult:
    """Assemble ``get_values``'s result from raw records (None = missing).

    Rows written under another column list are mapped by name into ``current``.
    """
    n = len(records)
    matrix = np.full((n, len(current)), np.nan, np.float32)
    watermarks = np.full(n, NO_WATERMARK, np.int64)
    pos = {c: j for j, c in enumerate(current)}
    groups: dict[tuple[int, int], list[int]] = {}
    head = _VAL_HEAD.size
    for i, rec in enumerate(records):
        if rec is None:
            continue
        if len(rec) < head or rec[:4] != _VAL_MAGIC:
            raise CorruptRecordError(
                f"value record {i} is truncated or has a bad magic ({len(rec)} bytes)"
            )
        _, cid, k, _, _ = _VAL_HEAD.unpack_from(rec, 0)
        if len(rec) != head + 4 * k:
            raise CorruptRecordError(
                f"value record {i} is truncated: {len(rec)} bytes for {k} columns"
            )
        groups.setdefault((cid, k), []).append(i)
    for (cid, k), rows in groups.items():
        # One frombuffer per column list: every record of a group has the same layout.
        dtype = np.dtype([("head", "V16"), ("wm", "<i8"), ("v", "<f4", (k,))])
        arr = np.frombuffer(b"".join(records[i] for i in rows), dtype)
        idx = np.asarray(rows)
        cols = column_lists.get(cid)
        if cols is None or len(cols) != k:
            continue  # written under a column list this store does not know: treat as missing
        watermarks[idx] = arr["wm"]
        src = [j for j, c in enumerate(cols) if c in pos]
        dst = [pos[cols[j]] for j in src]
        if src:
            matrix[np.ix_(idx, dst)] = arr["v"][:, src]
    return ValuesResult(matrix=matrix, watermarks=watermarks, columns=current)
