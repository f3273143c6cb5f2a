"""Decode all messages of a Kafka poll at once, field by field across messages, with numpy.

``decode_messages(payloads, topic)`` gives the same columns as decoding each message with
``schemas.columnar.decode_message`` and concatenating them, but it decodes the single-event
messages (Confluent framing: magic byte 0, 4-byte schema id, Avro body) together:

1. The payloads are joined into one byte buffer and every 5-byte header is checked at once.
2. One cursor per message walks that message's body, one schema field at a time for all
   messages. Reads go through a view of the buffer whose item ``p`` is the 8 bytes from
   ``p``, so a varint (zigzag long or int, string length, union branch, enum index), a
   double or a float is one gather plus a few bit operations for all messages.
3. String fields are dictionary-encoded: the bytes of each value (with its length) go
   into a hash table built a whole round of strings at a time, where every string compares
   its bytes with the one that won its slot. Only the distinct values become ``str``
   objects: ASCII ones in one numpy cast, the others through ``bytes.decode`` (which also
   rejects invalid UTF-8).

No Python code runs per message on that path. What it does not take goes, one message at a
time, through ``decode_message`` (the scalar reference), whose verdict then stands:

- messages it finds malformed or merely unusual: a bad or short header, a schema id other
  than the topic's, a read past the message end, a negative string length, a string longer
  than ``MAX_FAST_STRING`` bytes, a union branch or enum index out of range, an ``int``
  outside 32 bits, a varint over 10 bytes (or beyond 64 bits), trailing bytes, invalid UTF-8.
  When ``decode_message`` raises, ``str(exc)`` is the reason in ``errors``; when it accepts
  the message after all (fastavro reads union branch -1 as the last branch), its columns are
  used. So ``errors`` holds exactly the messages the scalar path rejects, with its wording.
- batch envelopes (schema id 100): already columnar, each is one ``decode_message`` call.

Topics whose schema the vectorized pass cannot describe (map fields, as in ``impressions``)
read each single event with fastavro (``schemas.codec.read_body``) and turn all the records
into columns with one ``records_to_columns`` call.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from itertools import chain
from typing import Literal, get_args

import numpy as np

from schemas.codec import HEADER_SIZE, MAGIC_BYTE, read_body
from schemas.columnar import (
    NULL_CODE,
    Column,
    DictColumn,
    EventColumns,
    concat_columns,
    decode_message,
    empty_columns,
    records_to_columns,
)
from schemas.errors import SchemaError, UnknownTopicError
from schemas.registry import TOPICS, FieldInfo, topic_schema

MAX_FAST_STRING = 64
"""Longest string, in bytes, the vectorized pass reads; a longer one sends its message to
the scalar path."""

FastKind = Literal["long", "int", "double", "float", "string", "enum"]

# Zero bytes after the last payload. A cursor stops at most MAX_FAST_STRING bytes past its
# message's end (it is then rejected) and reads at most 16 bytes from there.
_PADDING = bytes(MAX_FAST_STRING + 64)
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_U64 = np.uint64
_ONE, _ZERO = _U64(1), _U64(0)
_STOP_BITS = _U64(0x8080808080808080)  # the continuation bit of each byte of a varint
# Packing the 7-bit groups of a varint: at each step, the high half of every lane moves
# down next to the low half, closing the gap the dropped bits left.
_PACK_STEPS = (
    (_U64(0x7F007F007F007F00), _U64(0x007F007F007F007F), _U64(1)),
    (_U64(0x3FFF00003FFF0000), _U64(0x00003FFF00003FFF), _U64(2)),
    (_U64(0x0FFFFFFF00000000), _U64(0x000000000FFFFFFF), _U64(4)),
)
_ZIGZAG_BYTE = np.array([(b >> 1) ^ -(b & 1) for b in range(256)], dtype=np.int64)
_BYTE_MASKS = np.array([(1 << (8 * n)) - 1 for n in range(9)], dtype=np.uint64)
_HASH_MUL = _U64(0x9E3779B97F4A7C15)
_ROUNDS = tuple(_U64(0x5851F42D4C957F2D * k % 2**64) for k in range(8))  # hash table salts


@dataclass
class BulkDecoded:
    """The result of decoding many messages of one topic.

    ``columns`` holds every event of the messages that decoded, in message order (a batch
    envelope's events in their order within it); ``source_index[i]`` (int64) is the position
    in the input of the message that row ``i`` came from; ``errors`` maps the position of
    every message that did not decode to the reason the scalar path gives for it.
    """

    columns: EventColumns
    source_index: np.ndarray
    errors: dict[int, str]


# ---------------------------------------------------------------- the plan, from the schema


@dataclass(frozen=True)
class _Field:
    """How the vectorized pass reads one top-level field."""

    name: str
    kind: FastKind
    null_branch: int | None  # union branch of null in ["null", T] or [T, "null"]
    symbols: tuple[str, ...]


def _field_plan(info: FieldInfo) -> _Field | None:
    if info.kind not in get_args(FastKind):
        return None
    null_branch = None
    if info.nullable:
        if info.kind not in ("string", "enum"):
            return None  # no columnar form; records_to_columns says so
        null_branch = info.raw["type"].index("null")
    return _Field(info.name, info.kind, null_branch, info.symbols or ())  # type: ignore[arg-type]


@cache
def _plan(topic: str) -> tuple[_Field, ...] | None:
    """The fields of ``topic`` in wire order, or None when one needs the record path."""
    fields = [_field_plan(info) for info in topic_schema(topic).fields]
    return None if any(f is None for f in fields) else tuple(fields)  # type: ignore[misc]


# ---------------------------------------------------------------- reading all bodies at once


def _words_at(buf: np.ndarray) -> np.ndarray:
    """A view of ``buf`` whose item ``p`` is the little-endian uint64 of bytes ``p..p+7``."""
    return np.ndarray((len(buf) - 7,), dtype="<u8", buffer=buf, strides=(1,))


@dataclass
class _Cursor:
    """One read position per single-event message, in the buffer of all messages."""

    buf: np.ndarray  # uint8: every payload, then _PADDING
    words: np.ndarray  # _words_at(buf)
    pos: np.ndarray  # int64: next byte to read; past ``end`` only once rejected
    end: np.ndarray  # int64: end of the message
    ok: np.ndarray  # bool: the message is still on the fast path

    def reject(self, live: np.ndarray, bad: np.ndarray) -> None:
        """Send the ``live`` messages where ``bad`` holds to the scalar path."""
        self.ok &= ~(live & bad)

    def advance(self, live: np.ndarray, nbytes: np.ndarray | int) -> None:
        """Move the ``live`` cursors on by ``nbytes``; reject those that pass their end."""
        np.add(self.pos, nbytes, out=self.pos, where=live)
        self.ok &= self.pos <= self.end


def _varint_head(word: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode varints from their first 8 bytes: ``(value, size, longer)``.

    ``longer`` marks varints that go on past 8 bytes; their value holds the first 56 bits.
    """
    stops = ~word & _STOP_BITS
    first_stop = stops & (_ZERO - stops)  # 2 ** (8 * i + 7) for a stop in byte i; 0 if none
    keep = (first_stop << _ONE) - _ONE  # the bytes up to the first stop, or all 8
    size = np.frexp(first_stop.astype(np.float64))[1] >> 3  # i + 1 (0 when longer)
    value = word & keep & ~_STOP_BITS
    widest = int(size.max(initial=0)) if stops.all() else 8
    for step, (high, low, shift) in enumerate(_PACK_STEPS):
        if widest > 1 << step:
            value = ((value & high) >> shift) | (value & low)
    return value, size, stops == 0


def _varint_tail(cur: _Cursor, longer: np.ndarray, value: np.ndarray, size: np.ndarray) -> None:
    """Finish the 9- and 10-byte varints at ``longer`` rows in place; reject longer ones."""
    tail = cur.words[cur.pos + 8]
    b8, b9 = tail & _U64(0xFF), (tail >> _U64(8)) & _U64(0xFF)
    ten = b8 >= 0x80
    cur.reject(longer, ten & (b9 > 1))  # an 11th byte, or bits past 64
    high = np.where(ten, (b8 & _U64(0x7F)) | (b9 << _U64(7)), b8)
    value[longer] |= high[longer] << _U64(56)
    size[longer] = np.where(ten, 10, 9)[longer]


def _read_varint(cur: _Cursor, live: np.ndarray) -> np.ndarray:
    """Read one zigzag varint at each ``live`` cursor; return int64 (garbage elsewhere)."""
    first = cur.buf[cur.pos]
    if not ((first >= 0x80) & live).any():  # one byte each: lengths, branches, small ints
        cur.advance(live, 1)
        return _ZIGZAG_BYTE[first]
    value, size, longer = _varint_head(cur.words[cur.pos])
    longer &= live
    if longer.any():
        _varint_tail(cur, longer, value, size)
    cur.advance(live, size)
    return ((value >> _ONE) ^ (_ZERO - (value & _ONE))).view(np.int64)


def _read_float(cur: _Cursor, live: np.ndarray, kind: FastKind) -> np.ndarray:
    """Read a little-endian double (8 bytes) or float (4 bytes) per cursor, as float64."""
    word = cur.words[cur.pos]
    cur.advance(live, 8 if kind == "double" else 4)
    if kind == "double":
        return word.view("<f8").astype(np.float64)
    return (word & _U64(0xFFFFFFFF)).astype("<u4").view("<f4").astype(np.float64)


@dataclass
class _Raw:
    """One field read for every message: numbers, enum indexes or string spans."""

    values: np.ndarray  # int64 / float64 values, enum indexes, or string starts
    lengths: np.ndarray | None = None  # string lengths
    null: np.ndarray | None = None  # rows holding null (nullable fields only)


def _read_value(cur: _Cursor, live: np.ndarray, field: _Field) -> _Raw:
    if field.kind in ("double", "float"):
        return _Raw(_read_float(cur, live, field.kind))
    value = _read_varint(cur, live)
    if field.kind == "string":
        cur.reject(live, value.view(np.uint64) > MAX_FAST_STRING)  # negative or long
        live = live & cur.ok
        start = cur.pos.copy()
        cur.advance(live, value)
        return _Raw(start, value)
    if field.kind == "int":
        cur.reject(live, (value < _INT32_MIN) | (value > _INT32_MAX))
    elif field.kind == "enum":
        cur.reject(live, value.view(np.uint64) >= len(field.symbols))
    return _Raw(value)


def _read_field(cur: _Cursor, field: _Field) -> _Raw:
    """Read ``field`` at every cursor still on the fast path, moving the cursors past it."""
    live = cur.ok.copy()
    if field.null_branch is None:
        return _read_value(cur, live, field)
    branch = _read_varint(cur, live)
    cur.reject(live, branch.view(np.uint64) > 1)
    null = branch == field.null_branch
    raw = _read_value(cur, cur.ok & ~null, field)
    raw.null = null
    return raw


def _scan(cur: _Cursor, plan: tuple[_Field, ...]) -> list[_Raw]:
    """Read every field of every body; afterwards ``cur.ok`` marks the well-formed ones."""
    raws = [_read_field(cur, field) for field in plan]
    cur.ok &= cur.pos == cur.end  # no trailing bytes
    return raws


# ---------------------------------------------------------------- strings to dictionaries


def _string_keys(words: np.ndarray, start: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Return the strings as key words, shape (words, strings): each string's bytes,
    zero-padded, with its length in the last byte (so ``b"a"`` and ``b"a\\0"`` differ)."""
    nwords = (int(length.max(initial=0)) + 8) // 8
    keys = np.empty((nwords, len(start)), "<u8")
    for k in range(nwords):
        mask = _BYTE_MASKS[np.clip(length - 8 * k, 0, 8)]
        np.bitwise_and(words[start + 8 * k], mask, out=keys[k])
    keys[-1] |= length.astype(np.uint64) << _U64(56)
    return keys


def _hash(keys: np.ndarray) -> np.ndarray:
    """One uint64 per string (column of ``keys``), mixing all its words."""
    hashed = keys[0]
    for word in keys[1:]:
        hashed = (hashed * _HASH_MUL) ^ word
    return hashed


def _unique_strings(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(first, inverse)`` over the strings (columns) of ``keys``: one string index
    per distinct value, and each string's distinct id.

    A hash table without a loop per string: in each round, every pending string writes its
    index into its slot, then compares its bytes with those of the slot's winner. All copies
    of a value share their slot, so they settle in the same round; the values that lost a
    slot to another try again with a new hash. The few left after ``_ROUNDS`` are sorted.
    """
    n = keys.shape[1]
    rep = np.empty(n, np.intp)  # the string whose index names each string's value
    pending = np.arange(n)
    hashed = _hash(keys)
    bits = max(n.bit_length() + 1, 4)  # at least twice as many slots as strings
    table = np.empty(1 << bits, np.intp)
    for salt in _ROUNDS:
        if not len(pending):
            break
        slot = ((hashed[pending] ^ salt) * _HASH_MUL) >> _U64(64 - bits)
        table[slot] = pending
        owner = table[slot]
        same = keys[0][owner] == keys[0][pending]
        for word in keys[1:]:
            same &= word[owner] == word[pending]
        rep[pending[same]] = owner[same]
        pending = pending[~same]
    if len(pending):
        _, first, inverse = np.unique(
            keys[:, pending].T, axis=0, return_index=True, return_inverse=True
        )
        rep[pending] = pending[first][inverse.ravel()]
    first = np.flatnonzero(rep == np.arange(n))
    ids = np.empty(n, np.intp)
    ids[first] = np.arange(len(first))
    return first, ids[rep]


def _to_str(keys: np.ndarray, length: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Decode distinct strings (columns of ``keys``); return ``(values, bad)``, where bad
    marks invalid UTF-8."""
    content = np.ascontiguousarray(keys.T).view(np.uint8)[:, :-1]
    high = keys[0] & _STOP_BITS
    for word in keys[1:]:
        high |= word & _STOP_BITS
    last = content[np.arange(len(length)), np.maximum(length - 1, 0)]
    # ASCII, and not ending in NUL (numpy strips trailing NULs from the str it makes)
    plain = (high == 0) & ((last != 0) | (length == 0))
    if plain.all():
        return _ascii_to_str(content), np.zeros(len(length), bool)
    values = np.empty(len(length), object)
    values[plain] = _ascii_to_str(content[plain])
    bad = np.zeros(len(length), bool)
    for i in np.flatnonzero(~plain).tolist():
        try:
            values[i] = content[i, : length[i]].tobytes().decode("utf-8")
        except UnicodeDecodeError:
            bad[i] = True
    return values, bad


def _ascii_to_str(content: np.ndarray) -> np.ndarray:
    """Turn rows of ASCII bytes (zero-padded) into an object array of str."""
    # Each ASCII byte is its own code point: widen to UCS-4 and view as numpy str.
    ucs4 = content.astype(np.uint32)
    return ucs4.view(f"U{content.shape[1]}").ravel().astype(object)


def _encode_strings(
    words: np.ndarray, start: np.ndarray, length: np.ndarray
) -> tuple[DictColumn, np.ndarray]:
    """Dictionary-encode the strings of ``length`` bytes at ``start``; flag invalid UTF-8."""
    keys = _string_keys(words, start, length)
    first, inverse = _unique_strings(keys)
    values, bad_value = _to_str(keys[:, first], length[first])
    bad = bad_value[inverse] if bad_value.any() else np.zeros(len(inverse), bool)
    return DictColumn(inverse.astype(np.int32), values), bad


def _string_column(
    words: np.ndarray, raw: _Raw, rows: np.ndarray
) -> tuple[DictColumn, np.ndarray]:
    """The column of a string field over ``rows``, and which of those rows hold bad UTF-8."""
    lengths = raw.lengths if raw.lengths is not None else np.zeros_like(raw.values)
    if raw.null is None:
        return _encode_strings(words, raw.values[rows], lengths[rows])
    present = ~raw.null[rows]
    sub, sub_bad = _encode_strings(words, raw.values[rows[present]], lengths[rows[present]])
    codes = np.full(len(rows), NULL_CODE, np.int32)
    codes[present] = sub.codes
    bad = np.zeros(len(rows), bool)
    bad[present] = sub_bad
    return DictColumn(codes, sub.dictionary), bad


def _enum_column(field: _Field, raw: _Raw, rows: np.ndarray) -> DictColumn:
    codes = raw.values[rows].astype(np.int32)
    if raw.null is not None:
        codes[raw.null[rows]] = NULL_CODE
    symbols = np.empty(len(field.symbols), object)
    symbols[:] = field.symbols
    return DictColumn(codes, symbols)


def _fast_columns(
    topic: str, plan: tuple[_Field, ...], words: np.ndarray, raws: list[_Raw], ok: np.ndarray
) -> tuple[EventColumns, np.ndarray]:
    """Build the columns of the rows where ``ok``, and return them with those rows.

    Rows holding invalid UTF-8 are cleared from ``ok`` (in place) and left out.
    """
    while True:
        rows = np.flatnonzero(ok)
        cols: dict[str, Column] = {}
        bad = np.zeros(len(rows), bool)
        for field, raw in zip(plan, raws, strict=True):
            if field.kind == "string":
                cols[field.name], field_bad = _string_column(words, raw, rows)
                bad |= field_bad
            elif field.kind == "enum":
                cols[field.name] = _enum_column(field, raw, rows)
            else:
                cols[field.name] = raw.values[rows]
        if not bad.any():
            return EventColumns(topic, len(rows), cols), rows
        ok[rows[bad]] = False  # and again without them, so no dictionary keeps their values


# ---------------------------------------------------------------- framing, fallbacks, order


_Part = tuple[EventColumns, np.ndarray]  # columns, and the input position of each row


def _join(payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return ``(buf, starts, lengths)``: all payloads in one padded buffer.

    A value that is not bytes (a tombstone's None) counts as empty here, which sends it to
    the scalar path.
    """
    try:
        return _join_bytes(payloads)
    except TypeError:
        bytes_like = (bytes, bytearray, memoryview)
        return _join_bytes([p if isinstance(p, bytes_like) else b"" for p in payloads])


def _join_bytes(payloads: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lengths = np.fromiter(map(len, payloads), np.int64, count=len(payloads))
    starts = np.zeros(len(payloads), np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    buf = np.frombuffer(b"".join(chain(payloads, (_PADDING,))), np.uint8)
    return buf, starts, lengths


def _schema_ids(words: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Return each message's schema id, or -1 where its Confluent header is short or bad."""
    head = words[starts]
    big_endian_id = ((head >> _U64(8)) & _U64(0xFFFFFFFF)).astype(np.uint32).byteswap()
    framed = (lengths >= HEADER_SIZE) & ((head & _U64(0xFF)) == MAGIC_BYTE)
    return np.where(framed, big_endian_id.astype(np.int64), -1)


def _vectorized(
    topic: str,
    plan: tuple[_Field, ...],
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    single: np.ndarray,
) -> tuple[list[_Part], np.ndarray]:
    """Decode the single events at positions ``single``; also return the ones left over."""
    cur = _Cursor(
        buf, _words_at(buf), starts[single] + HEADER_SIZE, ends[single], np.ones(len(single), bool)
    )
    raws = _scan(cur, plan)
    cols, rows = _fast_columns(topic, plan, cur.words, raws, cur.ok)
    return [(cols, single[rows])], single[~cur.ok]


def _from_records(
    topic: str, payloads: Sequence[bytes], single: np.ndarray
) -> tuple[list[_Part], np.ndarray]:
    """Decode the single events at ``single`` with fastavro and one ``records_to_columns``;
    also return the ones left over."""
    ts = topic_schema(topic)
    records, kept, failed = [], [], []
    for i in single.tolist():
        try:
            records.append(read_body(ts, payloads[i], topic=topic))
            kept.append(i)
        except (SchemaError, ValueError):
            failed.append(i)
    try:
        cols = records_to_columns(topic, records)
    except (SchemaError, ValueError):
        return [], single  # let the scalar path sort them out one by one
    return [(cols, np.array(kept, np.int64))], np.array(failed, np.int64)


def _decode_one(payload: bytes, topic: str) -> EventColumns | str:
    """Decode one message with the scalar path; return its columns or why it failed."""
    try:
        return decode_message(payload, topic)
    except (SchemaError, ValueError) as exc:
        return str(exc)
    except Exception as exc:  # a poll must not be lost to one odd message
        return f"{type(exc).__name__}: {exc}"


def _one_by_one(
    topic: str, payloads: Sequence[bytes], positions: list[int]
) -> tuple[list[_Part], dict[int, str]]:
    """Decode the messages at ``positions`` with the scalar path: the columns of those that
    decode, as one part, and the reason each of the others fails."""
    decoded, kept, errors = [], [], {}
    for i in positions:
        got = _decode_one(payloads[i], topic)
        if isinstance(got, str):
            errors[i] = got
        else:
            decoded.append(got)
            kept.append(i)
    if not decoded:
        return [], errors
    source = np.repeat(np.array(kept, np.int64), [c.n for c in decoded])
    return [(concat_columns(decoded, topic=topic), source)], errors


def _assemble(topic: str, parts: list[_Part]) -> _Part:
    """Concatenate parts and put their rows in input order (stable within a message)."""
    parts = [p for p in parts if p[0].n]
    if not parts:
        return empty_columns(topic), np.empty(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    cols = concat_columns([c for c, _ in parts], topic=topic)
    source = np.concatenate([s for _, s in parts])
    if np.all(source[1:] >= source[:-1]):
        return cols, source
    order = np.argsort(source, kind="stable")
    return cols.take(order), source[order]


def decode_messages(payloads: Sequence[bytes], topic: str) -> BulkDecoded:
    """Decode many messages of ``topic`` (single events and/or batch envelopes), in order.

    The columns equal those of ``decode_message`` on each message that decodes, concatenated
    in input order; string dictionaries hold each value once. A message that fails is left
    out, with ``str()`` of the error ``decode_message`` raises for it in ``errors``: a bad
    message never makes this raise, nor loses the others.

    Raises:
        UnknownTopicError: ``topic`` is not an event topic.
    """
    if topic not in TOPICS:
        raise UnknownTopicError(topic, TOPICS)
    buf, starts, lengths = _join(payloads)
    is_single = _schema_ids(_words_at(buf), starts, lengths) == topic_schema(topic).schema_id
    single = np.flatnonzero(is_single)
    plan = _plan(topic)
    parts: list[_Part] = []
    rest = single[:0]
    if len(single) and plan is not None:
        parts, rest = _vectorized(topic, plan, buf, starts, starts + lengths, single)
    elif len(single):
        parts, rest = _from_records(topic, payloads, single)
    one_by_one = np.union1d(np.flatnonzero(~is_single), rest).tolist()
    slow, errors = _one_by_one(topic, payloads, one_by_one)
    cols, source = _assemble(topic, parts + slow)
    return BulkDecoded(cols, source, errors)


__all__ = ["MAX_FAST_STRING", "BulkDecoded", "decode_messages"]
