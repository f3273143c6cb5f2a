"""Decode all messages of a Kafka poll at once, field by field across messages, with numpy.

``decode_messages(payloads, topic)`` gives the same columns as decoding each message with
``schemas.columnar.decode_message`` and concatenating them, but it decodes the single-event
messages (Confluent framing: magic byte 0, 4-byte schema id, Avro body) together:

1. The payloads are joined into one byte buffer and every 5-byte header is checked at once.
2. One cursor per message walks that message's body, one schema field at a time for all
   messages. Reads go through a view of the buffer whose item ``p`` is the 8 bytes from
   ``p``, so a varint (zigzag long or int, string length, union branch, enum index), a
   double or a float is one gather plus a few bit operations for all messages.
3. A map field is a series of blocks of entries. It is walked one entry per step: each step
   reads a key and a value in every message still inside the map, and the next block header
   (count, and byte size after a negative count) where a block ended; a message leaves the
   walk when its map ends. So the steps are as many as the longest map has entries.
4. String fields, map keys and string map values are dictionary-encoded: the bytes of each
   value (with its length) go into a hash table built a whole round of strings at a time,
   where every string compares its bytes with the one that won its slot. Only the distinct
   values become ``str`` objects: ASCII ones in one numpy cast, the others through
   ``bytes.decode`` (which also rejects invalid UTF-8). Building each map's dict is the one
   piece of Python work per message.

``fields=`` (a projection) keeps the columns of those fields only; the others are still read
and checked, but skipped: no dictionaries, no dicts, any string length. Decoding a few plain
fields of ``impressions`` then costs little more than walking its maps.

Beyond those dicts, no Python code runs per message on that path. What it does not take
goes, one message at a time, through ``decode_message`` (the scalar reference), whose
verdict then stands:

- messages it finds malformed or merely unusual: a bad or short header, a schema id other
  than the topic's, a read past the message end, a negative string length, a string longer
  than ``MAX_FAST_STRING`` bytes in a field (or map) that is decoded, a union branch or enum
  index out of range, an ``int`` outside 32 bits, a varint over 10 bytes (or beyond 64
  bits), a map of more than ``MAX_FAST_MAP_ENTRIES`` entries, trailing bytes, invalid UTF-8;
  also the last few messages inside a map, when a poll's longest maps outlast the rest by
  far. When ``decode_message`` raises, ``str(exc)`` is the reason in ``errors``; when it
  accepts the message after all (fastavro reads union branch -1 as the last branch), its
  columns are used. So ``errors`` holds exactly the messages the scalar path rejects, with
  its wording (with a projection, see ``decode_messages`` for the one exception).
- batch envelopes (schema id 100): already columnar, each is one ``decode_message`` call.

Topics whose schema the vectorized pass cannot describe (a nullable number, a boolean, an
array: no topic today) read each single event with fastavro (``schemas.codec.read_body``)
and turn all the records into columns with one ``records_to_columns`` call.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from itertools import chain, islice
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
from schemas.registry import (
    FieldInfo,
    event_topics,
    is_event_topic,
    per_schema_cache,
    topic_schema,
)

MAX_FAST_STRING = 64
"""Longest string, in bytes, the vectorized pass reads; a longer one sends its message to
the scalar path."""

FastKind = Literal["long", "int", "double", "float", "string", "enum", "map"]
MapValues = Literal["double", "float", "string"]

MAX_FAST_MAP_ENTRIES = 128
"""Most entries a map may hold on the vectorized pass; a longer one sends its message to
the scalar path (the pass takes one step per entry, for all messages at once)."""

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
    map_values: MapValues | None = None


def _field_plan(info: FieldInfo) -> _Field | None:
    if info.kind not in get_args(FastKind):
        return None
    if info.kind == "map":
        if info.nullable or info.map_values not in get_args(MapValues):
            return None
        return _Field(info.name, "map", None, (), info.map_values)  # type: ignore[arg-type]
    null_branch = None
    if info.nullable:
        if info.kind not in ("string", "enum"):
            return None  # no columnar form; records_to_columns says so
        null_branch = info.raw["type"].index("null")
    return _Field(info.name, info.kind, null_branch, info.symbols or ())  # type: ignore[arg-type]


@per_schema_cache
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


def _varint_tail(
    words: np.ndarray, pos: np.ndarray, longer: np.ndarray, value: np.ndarray, size: np.ndarray
) -> np.ndarray:
    """Finish the 9- and 10-byte varints at ``longer`` rows in place; return the rows among
    them that go on (an 11th byte, or bits past 64)."""
    tail = words[pos + 8]
    b8, b9 = tail & _U64(0xFF), (tail >> _U64(8)) & _U64(0xFF)
    ten = b8 >= 0x80
    high = np.where(ten, (b8 & _U64(0x7F)) | (b9 << _U64(7)), b8)
    value[longer] |= high[longer] << _U64(56)
    size[longer] = np.where(ten, 10, 9)[longer]
    return longer & ten & (b9 > 1)


def _unzigzag(value: np.ndarray) -> np.ndarray:
    return ((value >> _ONE) ^ (_ZERO - (value & _ONE))).view(np.int64)


def _read_varint(cur: _Cursor, live: np.ndarray) -> np.ndarray:
    """Read one zigzag varint at each ``live`` cursor; return int64 (garbage elsewhere)."""
    first = cur.buf[cur.pos]
    if not ((first >= 0x80) & live).any():  # one byte each: lengths, branches, small ints
        cur.advance(live, 1)
        return _ZIGZAG_BYTE[first]
    value, size, longer = _varint_head(cur.words[cur.pos])
    longer &= live
    if longer.any():
        cur.reject(longer, _varint_tail(cur.words, cur.pos, longer, value, size))
    cur.advance(live, size)
    return _unzigzag(value)


def _varints_at(
    cur: _Cursor, pos: np.ndarray
) -> tuple[np.ndarray, np.ndarray | int, np.ndarray]:
    """Read one zigzag varint at each of ``pos`` (not the cursors' own positions): return
    ``(value, size, bad)``, bad marking varints over 10 bytes or beyond 64 bits."""
    first = cur.buf[pos]
    if not (first >= 0x80).any():
        return _ZIGZAG_BYTE[first], 1, np.zeros(len(pos), bool)
    value, size, longer = _varint_head(cur.words[pos])
    bad = _varint_tail(cur.words, pos, longer, value, size) if longer.any() else longer
    return _unzigzag(value), size, bad


def _read_float(cur: _Cursor, live: np.ndarray, kind: FastKind) -> np.ndarray:
    """Read a little-endian double (8 bytes) or float (4 bytes) per cursor, as float64."""
    word = cur.words[cur.pos]
    cur.advance(live, 8 if kind == "double" else 4)
    if kind == "double":
        return word.view("<f8").astype(np.float64)
    return (word & _U64(0xFFFFFFFF)).astype("<u4").view("<f4").astype(np.float64)


@dataclass
class _MapEntries:
    """The entries of one map field for every message, grouped by message (in cursor order),
    each message's entries in wire order."""

    counts: np.ndarray  # int64 per cursor: entries read (complete where the cursor is ok)
    key_start: np.ndarray
    key_len: np.ndarray
    value: np.ndarray  # where each double/float value is, or where each string value starts
    value_len: np.ndarray | None  # string values only


@dataclass
class _Raw:
    """One field read for every message: numbers, enum indexes, string spans or map entries."""

    values: np.ndarray  # int64 / float64 values, enum indexes, or string starts
    lengths: np.ndarray | None = None  # string lengths
    null: np.ndarray | None = None  # rows holding null (nullable fields only)
    entries: _MapEntries | None = None  # map fields only


def _read_value(cur: _Cursor, live: np.ndarray, field: _Field, keep: bool) -> _Raw:
    if field.kind in ("double", "float"):
        return _Raw(_read_float(cur, live, field.kind))
    value = _read_varint(cur, live)
    if field.kind == "string":
        if keep:
            cur.reject(live, value.view(np.uint64) > MAX_FAST_STRING)  # negative or long
        else:  # any length that fits in the message
            cur.reject(live, (value < 0) | (value > cur.end - cur.pos))
        live = live & cur.ok
        start = cur.pos.copy()
        cur.advance(live, value)
        return _Raw(start, value)
    if field.kind == "int":
        cur.reject(live, (value < _INT32_MIN) | (value > _INT32_MAX))
    elif field.kind == "enum":
        cur.reject(live, value.view(np.uint64) >= len(field.symbols))
    return _Raw(value)


def _read_field(cur: _Cursor, field: _Field, keep: bool = True) -> _Raw:
    """Read ``field`` at every cursor still on the fast path, moving the cursors past it.

    With ``keep`` false the field is only checked and skipped: strings may then be of any
    length, and map entries are not kept (the raw read is not for building a column).
    """
    if field.kind == "map":
        return _Raw(np.empty(0, np.int64), entries=_read_map(cur, field, keep))
    live = cur.ok.copy()
    if field.null_branch is None:
        return _read_value(cur, live, field, keep)
    branch = _read_varint(cur, live)
    cur.reject(live, branch.view(np.uint64) > 1)
    null = branch == field.null_branch
    raw = _read_value(cur, cur.ok & ~null, field, keep)
    raw.null = null
    return raw


def _scan(
    cur: _Cursor, plan: tuple[_Field, ...], keep: frozenset[str] | None = None
) -> list[_Raw | None]:
    """Read every field of every body; afterwards ``cur.ok`` marks the well-formed ones.

    Fields outside ``keep`` (when given) are checked and skipped; their entry is None.
    """
    raws: list[_Raw | None] = []
    for field in plan:
        kept = keep is None or field.name in keep
        raw = _read_field(cur, field, kept)
        raws.append(raw if kept else None)
    cur.ok &= cur.pos == cur.end  # no trailing bytes
    return raws


# ---------------------------------------------------------------- maps, one entry per step

# When no more than this many messages (and at most 1/64 of those that entered) are still
# inside a map, with many entries left, they go to the scalar path: one step costs about
# what decoding a message alone does, so stepping on for a few long maps would cost more.
_MAP_TAIL = 8


@dataclass
class _Walk:
    """The messages still inside one map: their cursor rows, read positions, message ends,
    the entries left in the current block, and the entries read so far."""

    rows: np.ndarray
    pos: np.ndarray
    end: np.ndarray
    left: np.ndarray
    seen: np.ndarray

    def subset(self, stay: np.ndarray) -> _Walk:
        """The messages where ``stay`` holds."""
        return _Walk(self.rows[stay], self.pos[stay], self.end[stay], self.left[stay],
                     self.seen[stay])


def _string_at(
    cur: _Cursor, pos: np.ndarray, end: np.ndarray, longest: int | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read a string at each of ``pos``: return ``(start, length, position after, bad)``.

    Bad: a bad length varint, a negative length, a string running past ``end`` or longer
    than ``longest``. A bad string is not stepped over, so no position runs far past ``end``.
    """
    length, size, bad = _varints_at(cur, pos)
    start = pos + size
    bad |= (length < 0) | (length > end - start)
    if longest is not None:
        bad |= length > longest
    return start, length, start + np.where(bad, 0, length), bad


def _block_header(
    cur: _Cursor, pos: np.ndarray, end: np.ndarray, seen: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a map block header at each of ``pos``: return ``(entries, position after, bad)``.

    A negative count ``-n`` means ``n`` entries after a varint holding the block's size in
    bytes, which fastavro reads and ignores; so does this. Bad: a bad varint, a header
    running past ``end``, or more than MAX_FAST_MAP_ENTRIES entries counting ``seen``.
    """
    count, size, bad = _varints_at(cur, pos)
    pos = pos + size
    negative = count < 0
    if negative.any():
        _, block_size, size_bad = _varints_at(cur, pos)
        pos = pos + np.where(negative, block_size, 0)
        bad |= negative & size_bad
        count = np.where(negative, -count, count)  # -(-2**63) stays negative: bad below
    bad |= (count < 0) | (count > MAX_FAST_MAP_ENTRIES - seen) | (pos > end)
    return count, pos, bad


def _read_map(cur: _Cursor, field: _Field, keep: bool) -> _MapEntries | None:
    """Walk the map ``field`` at every cursor still on the fast path and move the cursors
    past it; return its entries when ``keep``.

    Each step reads one entry (key, then value) of every message still inside the map, and
    the next block header of those whose block ended; a message leaves the walk when its map
    ends (count 0) or when it is rejected. Every read is bounds-checked first, so the
    positions of the walk never run more than a varint or a value past their message's end.
    """
    rows = np.flatnonzero(cur.ok)
    end, seen = cur.end[rows], np.zeros(len(rows), np.int64)
    left, pos, bad = _block_header(cur, cur.pos[rows], end, seen)
    walk = _Walk(rows, pos, end, left, seen)
    total = len(rows)
    longest = MAX_FAST_STRING if keep else None
    steps: list[tuple[np.ndarray | None, ...]] = []
    while True:
        leave = bad | (walk.left == 0)
        if leave.any():
            cur.ok[walk.rows[bad]] = False
            done = leave & ~bad
            cur.pos[walk.rows[done]] = walk.pos[done]
            walk = walk.subset(~leave)
        if len(walk.rows) == 0:
            break
        few = len(walk.rows) <= _MAP_TAIL and 64 * len(walk.rows) <= total
        if few and int(walk.left.max()) > 2 * len(walk.rows):
            cur.ok[walk.rows] = False
            break
        key_start, key_len, pos, bad = _string_at(cur, walk.pos, walk.end, longest)
        if field.map_values == "string":
            value, value_len, pos, value_bad = _string_at(cur, pos, walk.end, longest)
            bad |= value_bad
        else:
            value, value_len = pos, None
            pos = pos + (8 if field.map_values == "double" else 4)
            bad |= pos > walk.end
        if keep:
            steps.append((walk.rows, walk.seen, key_start, key_len, value, value_len))
        walk.pos, walk.seen, walk.left = pos, walk.seen + 1, walk.left - 1
        ended = (walk.left == 0) & ~bad
        if ended.any():
            count, after, header_bad = _block_header(
                cur, walk.pos[ended], walk.end[ended], walk.seen[ended]
            )
            walk.left[ended], walk.pos[ended] = count, after
            bad[ended] |= header_bad
    return _group_entries(steps, len(cur.ok)) if keep else None


def _group_entries(steps: list[tuple[np.ndarray | None, ...]], n: int) -> _MapEntries:
    """Put the entries read step by step (``(rows, index in message, key start, key length,
    value, value length)`` per step) in message order, each message's in wire order."""
    if not steps:
        empty = np.empty(0, np.int64)
        return _MapEntries(np.zeros(n, np.int64), empty, empty, empty, None)
    rows, index, key_start, key_len, value = (
        np.concatenate([step[k] for step in steps]) for k in range(5)
    )
    counts = np.bincount(rows, minlength=n).astype(np.int64)
    first = np.zeros(n, np.int64)
    np.cumsum(counts[:-1], out=first[1:])
    slot = first[rows] + index  # the entries of a message were read as 0, 1, 2...

    def grouped(values: np.ndarray) -> np.ndarray:
        out = np.empty_like(values)
        out[slot] = values
        return out

    value_len = None
    if steps[0][5] is not None:
        value_len = grouped(np.concatenate([step[5] for step in steps]))
    return _MapEntries(counts, grouped(key_start), grouped(key_len), grouped(value), value_len)


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


def _float_values(words: np.ndarray, where: np.ndarray, kind: MapValues) -> np.ndarray:
    """The doubles (or floats) stored at ``where``, as float64."""
    word = words[where]
    if kind == "double":
        return word.view("<f8").astype(np.float64)
    return (word & _U64(0xFFFFFFFF)).astype("<u4").view("<f4").astype(np.float64)


def _map_column(
    words: np.ndarray, field: _Field, entries: _MapEntries, ok: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The column of a map field over the rows where ``ok`` (an object array of dicts), and
    which of those rows hold invalid UTF-8 in a key or value.

    Keys and string values are dictionary-encoded first, so each distinct one becomes a
    ``str`` once; only building the dicts is Python work per message.
    """
    counts = entries.counts[ok]
    entry = np.repeat(ok, entries.counts)  # the entries of the rows where ok
    keys, bad_entry = _encode_strings(words, entries.key_start[entry], entries.key_len[entry])
    if entries.value_len is not None:
        strings, bad_value = _encode_strings(
            words, entries.value[entry], entries.value_len[entry]
        )
        values = strings.values().tolist()
        bad_entry |= bad_value
    else:
        values = _float_values(words, entries.value[entry], field.map_values or "double").tolist()
    pairs = zip(keys.values().tolist(), values, strict=True)
    column = np.empty(len(counts), object)
    column[:] = [dict(islice(pairs, c)) for c in counts.tolist()]
    bad = np.zeros(len(counts), bool)
    if bad_entry.any():
        bad[np.repeat(np.arange(len(counts)), counts)[bad_entry]] = True
    return column, bad


def _fast_columns(
    topic: str,
    plan: tuple[_Field, ...],
    words: np.ndarray,
    raws: list[_Raw | None],
    ok: np.ndarray,
) -> tuple[EventColumns, np.ndarray]:
    """Build the columns of the rows where ``ok``, and return them with those rows.

    A field whose raw read is None (not kept) gets no column. Rows holding invalid UTF-8 are
    cleared from ``ok`` (in place) and left out.
    """
    while True:
        rows = np.flatnonzero(ok)
        cols: dict[str, Column] = {}
        bad = np.zeros(len(rows), bool)
        for field, raw in zip(plan, raws, strict=True):
            if raw is None:
                continue
            if field.kind == "string":
                cols[field.name], field_bad = _string_column(words, raw, rows)
                bad |= field_bad
            elif field.kind == "map" and raw.entries is not None:
                cols[field.name], field_bad = _map_column(words, field, raw.entries, ok)
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
    keep: tuple[str, ...] | None,
    buf: np.ndarray,
    starts: np.ndarray,
    ends: np.ndarray,
    single: np.ndarray,
) -> tuple[list[_Part], np.ndarray]:
    """Decode the single events at positions ``single`` (only the fields in ``keep``, when
    given); also return the ones left over."""
    cur = _Cursor(
        buf, _words_at(buf), starts[single] + HEADER_SIZE, ends[single], np.ones(len(single), bool)
    )
    raws = _scan(cur, plan, None if keep is None else frozenset(keep))
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


def _project(cols: EventColumns, keep: tuple[str, ...] | None) -> EventColumns:
    """Keep only the columns named in ``keep`` (all of them when None)."""
    if keep is None or list(cols.columns) == list(keep):
        return cols
    return EventColumns(cols.topic, cols.n, {name: cols.columns[name] for name in keep})


def _projection(topic: str, fields: Collection[str] | None) -> tuple[str, ...] | None:
    """The fields to decode, in schema order; None for all of them."""
    if fields is None:
        return None
    if isinstance(fields, str):
        raise TypeError(
            f"fields must be a collection of field names, got the str {fields!r}; "
            f"write fields=({fields!r},)"
        )
    names = topic_schema(topic).field_names
    for name in fields:
        if name not in names:
            raise ValueError(
                f"topic {topic!r} has no field {name!r}: its fields are {', '.join(names)}"
            )
    return tuple(name for name in names if name in set(fields))


def _assemble(topic: str, keep: tuple[str, ...] | None, parts: list[_Part]) -> _Part:
    """Concatenate parts and put their rows in input order (stable within a message)."""
    parts = [(_project(c, keep), s) for c, s in parts if c.n]
    if not parts:
        return _project(empty_columns(topic), keep), np.empty(0, np.int64)
    if len(parts) == 1:
        return parts[0]
    cols = concat_columns([c for c, _ in parts], topic=topic)
    source = np.concatenate([s for _, s in parts])
    if np.all(source[1:] >= source[:-1]):
        return cols, source
    order = np.argsort(source, kind="stable")
    return cols.take(order), source[order]


def decode_messages(
    payloads: Sequence[bytes], topic: str, *, fields: Collection[str] | None = None
) -> BulkDecoded:
    """Decode many messages of ``topic`` (single events and/or batch envelopes), in order.

    The columns equal those of ``decode_message`` on each message that decodes, concatenated
    in input order; string dictionaries hold each value once. A message that fails is left
    out, with ``str()`` of the error ``decode_message`` raises for it in ``errors``: a bad
    message never makes this raise, nor loses the others.

    Args:
        payloads: the message values of one poll (None, a tombstone, fails as empty).
        topic: the event topic they were read from.
        fields: decode only these fields: the columns are then those of the full decode
            restricted to them, in schema order. The other fields are still read and checked
            on the way, so the same messages fail, for the same reasons, with one exception:
            invalid UTF-8 in a string (or map key or value) of a field left out is not
            noticed, and such a message decodes. None (the default) decodes every field.

    Raises:
        UnknownTopicError: ``topic`` is not an event topic.
        ValueError: ``fields`` names a field ``topic`` does not have.
        TypeError: ``fields`` is a single str rather than a collection of names.
    """
    if not is_event_topic(topic):
        raise UnknownTopicError(topic, event_topics())
    keep = _projection(topic, fields)
    buf, starts, lengths = _join(payloads)
    is_single = _schema_ids(_words_at(buf), starts, lengths) == topic_schema(topic).schema_id
    single = np.flatnonzero(is_single)
    plan = _plan(topic)
    parts: list[_Part] = []
    rest = single[:0]
    if len(single) and plan is not None:
        parts, rest = _vectorized(topic, plan, keep, buf, starts, starts + lengths, single)
    elif len(single):
        parts, rest = _from_records(topic, payloads, single)
    one_by_one = np.union1d(np.flatnonzero(~is_single), rest).tolist()
    slow, errors = _one_by_one(topic, payloads, one_by_one)
    cols, source = _assemble(topic, keep, parts + slow)
    return BulkDecoded(cols, source, errors)


__all__ = ["MAX_FAST_MAP_ENTRIES", "MAX_FAST_STRING", "BulkDecoded", "decode_messages"]
