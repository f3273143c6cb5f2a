"""Columnar events: many events of one topic as numpy columns, and the batch envelope codec.

A batch travels as one Kafka message with schema id 100 (``event_batch.avsc``). Decoding a
batch makes one fastavro call for the envelope; every column is then a ``np.frombuffer`` view,
so there is no Python work per event (map columns excepted: they are the slow path).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Literal

import numpy as np
from fastavro import schemaless_writer

from schemas.codec import HEADER_SIZE, check_schema_allowed, frame, read_body, read_header
from schemas.errors import DecodeError, EncodeError, SchemaError, UnknownTopicError
from schemas.registry import (
    BATCH_SCHEMA_ID,
    FieldInfo,
    batch_schema,
    event_topics,
    is_event_topic,
    per_schema_cache,
    topic_for_schema_id,
    topic_schema,
)

NULL_CODE = -1
WireKind = Literal["i64", "i32", "f64", "dict_str", "map_f64", "map_str"]
_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


@dataclass(eq=False)
class DictColumn:
    """A dictionary-encoded string column: ``dictionary[codes[i]]``, code -1 meaning null.

    ``codes`` is int32; ``dictionary`` is an object array of str and may hold unused entries.
    """

    codes: np.ndarray
    dictionary: np.ndarray

    def __len__(self) -> int:
        return len(self.codes)

    def values(self) -> np.ndarray:
        """Return the decoded values as an object array (None where the code is -1)."""
        lookup = np.empty(len(self.dictionary) + 1, dtype=object)
        lookup[:-1] = self.dictionary
        lookup[-1] = None  # code -1 indexes the last slot
        return lookup[self.codes]

    def take(self, indices: np.ndarray | Sequence[int]) -> DictColumn:
        """Return the rows at ``indices``, sharing this column's dictionary."""
        return DictColumn(self.codes[np.asarray(indices, dtype=np.intp)], self.dictionary)

    @classmethod
    def from_values(cls, values: Iterable[str | None]) -> DictColumn:
        """Dictionary-encode ``values`` in first-seen order; None becomes code -1."""
        index: dict[Any, int] = {}
        codes = np.fromiter(
            (NULL_CODE if v is None else index.setdefault(v, len(index)) for v in values),
            dtype=np.int32,
        )
        return cls(codes, _object_array(list(index)))

    @classmethod
    def concat(cls, parts: Sequence[DictColumn], *, dedupe: bool = True) -> DictColumn:
        """Concatenate columns, merging their dictionaries and remapping codes.

        With ``dedupe=False`` the dictionaries are appended as they are (a value may then
        appear under several codes): no Python work per dictionary entry, for the hot path.
        """
        if not parts:
            return cls(np.empty(0, np.int32), _object_array([]))
        first = parts[0].dictionary
        if all(p.dictionary is first for p in parts):
            return cls(np.concatenate([p.codes for p in parts]), first)
        if not dedupe:
            sizes = np.array([len(p.dictionary) for p in parts], dtype=np.int64)
            base = np.concatenate(([0], np.cumsum(sizes)[:-1]))
            codes = np.concatenate([np.where(p.codes >= 0, p.codes + b, NULL_CODE)
                                    for p, b in zip(parts, base.tolist())]).astype(np.int32)
            return cls(codes, np.concatenate([p.dictionary for p in parts]))
        index: dict[str, int] = {}
        remapped = []
        for p in parts:
            remap = np.empty(len(p.dictionary) + 1, dtype=np.int32)
            for i, v in enumerate(p.dictionary):
                remap[i] = index.setdefault(v, len(index))
            remap[-1] = NULL_CODE
            remapped.append(remap[p.codes])
        return cls(np.concatenate(remapped), _object_array(list(index)))


@dataclass(eq=False)
class MapMatrix:
    """A map-of-double column as a matrix: row ``i`` maps ``keys[j]`` to ``values[i, j]``
    wherever ``present[i, j]``, in the order of ``keys``.

    An encode-side shape for maps whose rows share their keys (a served page's logged
    features and scores): ``encode_batch`` writes it without a Python dict per row, in
    exactly the bytes the same rows as dicts (keys in this order) would give.
    """

    keys: tuple[str, ...]
    values: np.ndarray
    present: np.ndarray

    def __post_init__(self) -> None:
        self.values = np.asarray(self.values, dtype=np.float64)
        self.present = np.asarray(self.present, dtype=bool)
        if self.values.ndim != 2 or self.values.shape[1] != len(self.keys) \
                or self.present.shape != self.values.shape:
            raise ValueError(f"MapMatrix: values {self.values.shape} and present "
                             f"{self.present.shape} must both be (rows, {len(self.keys)} keys)")

    def __len__(self) -> int:
        return self.values.shape[0]

    def to_dicts(self) -> list[dict[str, float]]:
        """One dict per row (the row's present keys, in key order)."""
        keys = self.keys
        return [{keys[j]: v for j, v in zip(np.flatnonzero(p).tolist(), row[p].tolist())}
                for row, p in zip(self.values, self.present)]


Column = np.ndarray | DictColumn | MapMatrix


def _object_array(items: list[Any]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


@dataclass(eq=False)
class EventColumns:
    """``n`` events of one topic as columns, in the topic schema's field order.

    Integer fields are int64 arrays, double fields float64, string and enum fields
    DictColumn, map fields object arrays of dicts. Arrays decoded from a batch are read-only
    views of the message bytes.
    """

    topic: str
    n: int
    columns: dict[str, Column]

    def __post_init__(self) -> None:
        for name, col in self.columns.items():
            if len(col) != self.n:
                raise ValueError(f"column {name!r} has {len(col)} values, expected n={self.n}")

    def __len__(self) -> int:
        return self.n

    def values(self, name: str) -> np.ndarray:
        """Return column ``name`` as a plain array (dictionary columns decoded)."""
        col = self.columns[name]
        return col.values() if isinstance(col, DictColumn) else col

    def take(self, indices: np.ndarray | Sequence[int]) -> EventColumns:
        """Return the events at ``indices`` (integer positions, in that order)."""
        idx = np.asarray(indices)
        if idx.dtype == bool:
            raise TypeError("take() wants integer positions; use filter() for a boolean mask")
        idx = idx.astype(np.intp, copy=False)
        cols = {
            k: c.take(idx) if isinstance(c, DictColumn) else c[idx] for k, c in self.columns.items()
        }
        return EventColumns(self.topic, len(idx), cols)

    def filter(self, mask: np.ndarray | Sequence[bool]) -> EventColumns:
        """Return the events where the boolean ``mask`` is true."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != (self.n,):
            raise ValueError(f"mask has shape {m.shape}, expected ({self.n},)")
        return self.take(np.flatnonzero(m))

    def equals(self, other: EventColumns) -> bool:
        """Return True if both hold the same topic, columns and values (dictionaries may differ)."""
        if self.topic != other.topic or self.n != other.n:
            return False
        if list(self.columns) != list(other.columns):
            return False
        for name in self.columns:
            a, b = self.values(name), other.values(name)
            if a.dtype != b.dtype:
                return False
            if not np.array_equal(a, b, equal_nan=a.dtype.kind == "f"):
                return False
        return True


@dataclass(frozen=True)
class _Spec:
    """How one field of a topic is carried as a column."""

    info: FieldInfo
    wire: WireKind

    @property
    def name(self) -> str:
        return self.info.name


def _wire_kind(topic: str, info: FieldInfo) -> WireKind:
    if info.kind in ("string", "enum"):
        return "dict_str"
    if info.nullable:
        raise SchemaError(f"{topic}.{info.name}: nullable {info.kind} has no columnar form")
    if info.kind == "long":
        return "i64"
    if info.kind == "int":
        return "i32"
    if info.kind in ("double", "float"):
        return "f64"
    if info.kind == "map" and info.map_values in ("double", "float"):
        return "map_f64"
    if info.kind == "map" and info.map_values == "string":
        return "map_str"
    raise SchemaError(f"{topic}.{info.name}: type {info.type_name} has no columnar form")


@per_schema_cache
def _specs(topic: str) -> tuple[_Spec, ...]:
    if not is_event_topic(topic):
        raise UnknownTopicError(topic, event_topics())
    return tuple(_Spec(f, _wire_kind(topic, f)) for f in topic_schema(topic).fields)


@per_schema_cache
def _spec_map(topic: str) -> dict[str, _Spec]:
    return {s.name: s for s in _specs(topic)}


# ---------------------------------------------------------------- records <-> columns


def _first_bad(vals: list[Any], ok: Any) -> tuple[int, Any]:
    for i, v in enumerate(vals):
        if not ok(v):
            return i, v
    return -1, None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_column(topic: str, spec: _Spec, vals: list[Any]) -> np.ndarray:
    lo, hi = (_INT32_MIN, _INT32_MAX) if spec.wire == "i32" else (_INT64_MIN, _INT64_MAX)
    arr = np.array(vals) if vals else np.empty(0, np.int64)
    if arr.dtype.kind != "i" or (len(arr) and (arr.min() < lo or arr.max() > hi)):
        i, v = _first_bad(vals, lambda x: _is_int(x) and lo <= x <= hi)
        raise EncodeError(
            f"record {i}: expected {spec.info.kind} in [{lo}, {hi}], got {type(v).__name__} {v!r}",
            topic=topic,
            field=spec.name,
        )
    return arr.astype(np.int64, copy=False)


def _float_column(topic: str, spec: _Spec, vals: list[Any]) -> np.ndarray:
    arr = np.array(vals) if vals else np.empty(0, np.float64)
    if arr.dtype.kind not in "if":
        i, v = _first_bad(vals, _is_number)
        raise EncodeError(
            f"record {i}: expected double, got {type(v).__name__} {v!r}",
            topic=topic,
            field=spec.name,
        )
    return arr.astype(np.float64, copy=False)


def _check_dict_column(
    topic: str, spec: _Spec, col: Any, n: int, error: type[DecodeError | EncodeError]
) -> None:
    """Check codes range, nulls and enum symbols of a dictionary column; raise ``error``."""

    def fail(reason: str) -> None:
        raise error(reason, topic=topic, field=spec.name)

    if not isinstance(col, DictColumn):
        fail(f"expected a DictColumn, got {type(col).__name__}")
    if len(col.codes) != n:
        fail(f"column length mismatch: {len(col.codes)} codes, expected count={n}")
    size = len(col.dictionary)
    if n:
        lo, hi = int(col.codes.min()), int(col.codes.max())
        if lo < NULL_CODE or hi >= size:
            fail(f"code out of dictionary range: codes span [{lo}, {hi}], dictionary has {size}")
        if lo == NULL_CODE and not spec.info.nullable:
            fail(f"null (code -1) in non-nullable {spec.info.type_name} column")
    # The Avro reader already guarantees str entries, so only the encode side scans them.
    bad = (
        None
        if error is DecodeError
        else next((v for v in col.dictionary if not isinstance(v, str)), None)
    )
    if bad is not None:
        fail(f"dictionary holds {type(bad).__name__} {bad!r}, expected str")
    if spec.info.symbols is not None:
        unknown = set(col.dictionary.tolist()) - set(spec.info.symbols)
        if unknown:
            fail(
                f"unknown enum symbol(s) {', '.join(sorted(unknown))}; allowed: "
                f"{', '.join(spec.info.symbols)}"
            )


def _map_column(topic: str, spec: _Spec, vals: list[Any]) -> np.ndarray:
    value_ok = _is_number if spec.wire == "map_f64" else (lambda v: isinstance(v, str))
    for i, m in enumerate(vals):
        if not isinstance(m, Mapping):
            raise EncodeError(
                f"record {i}: expected a map, got {type(m).__name__}", topic=topic, field=spec.name
            )
        for k, v in m.items():
            if not isinstance(k, str) or not value_ok(v):
                raise EncodeError(
                    f"record {i}: bad entry {k!r}: {v!r} for map of string to "
                    f"{spec.info.map_values}",
                    topic=topic,
                    field=spec.name,
                )
    return _object_array([dict(m) for m in vals])


def records_to_columns(topic: str, records: Sequence[Mapping[str, Any]]) -> EventColumns:
    """Turn records of ``topic`` into columns, filling defaults for missing fields.

    Raises:
        EncodeError: a record misses a required field or holds a value of the wrong type.
        UnknownTopicError: ``topic`` is not an event topic.
    """
    n = len(records)
    cols: dict[str, Column] = {}
    for spec in _specs(topic):
        name, info = spec.name, spec.info
        if info.has_default:
            default = info.default
            vals = [r.get(name, default) for r in records]
        else:
            try:
                vals = [r[name] for r in records]
            except KeyError:
                i = next(i for i, r in enumerate(records) if name not in r)
                raise EncodeError(
                    f"record {i} is missing required field", topic=topic, field=name
                ) from None
        if spec.wire in ("i64", "i32"):
            cols[name] = _int_column(topic, spec, vals)
        elif spec.wire == "f64":
            cols[name] = _float_column(topic, spec, vals)
        elif spec.wire == "dict_str":
            col = DictColumn.from_values(vals)
            _check_dict_column(topic, spec, col, n, EncodeError)
            cols[name] = col
        else:
            cols[name] = _map_column(topic, spec, vals)
    return EventColumns(topic, n, cols)


def columns_of(topic: str, n: int, values: Mapping[str, Any]) -> EventColumns:
    """Return ``n`` events of ``topic`` from one value per field, without a dict per event.

    Each value is a whole column (a list or array of ``n``, a ``DictColumn``, a
    ``MapMatrix``) or one value every event shares (a number, a string, a dict for a map
    field). A missing field takes its default.

    Raises:
        EncodeError: a required field is missing, a value has the wrong type or length.
    """
    specs = _spec_map(topic)
    unknown = next((k for k in values if k not in specs), None)
    if unknown is not None:
        raise EncodeError(f"unknown field; the fields of {topic!r} are {', '.join(specs)}",
                          topic=topic, field=unknown)
    cols: dict[str, Column] = {}
    for name, spec in specs.items():
        if name not in values:
            if not spec.info.has_default:
                raise EncodeError("missing required field", topic=topic, field=name)
            cols[name] = _default_column(spec, n)
            continue
        v = values[name]
        if isinstance(v, (DictColumn, MapMatrix)):
            cols[name] = v
        elif spec.wire == "dict_str":
            if v is None or isinstance(v, str):
                col = DictColumn(np.full(n, NULL_CODE if v is None else 0, np.int32),
                                 _object_array([] if v is None or not n else [v]))
            else:
                col = DictColumn.from_values(v)
            _check_dict_column(topic, spec, col, n, EncodeError)
            cols[name] = col
        elif spec.wire in ("i64", "i32", "f64"):
            vals = [v] * n if np.isscalar(v) else list(v)
            cols[name] = (_float_column if spec.wire == "f64" else _int_column)(topic, spec, vals)
        else:
            vals = [v] * n if isinstance(v, Mapping) else list(v)
            cols[name] = _map_column(topic, spec, vals)
    return EventColumns(topic, n, cols)


def empty_columns(topic: str) -> EventColumns:
    """Return zero events of ``topic`` with every column present."""
    return records_to_columns(topic, [])


def _to_list(col: Column) -> list[Any]:
    if isinstance(col, DictColumn):
        return col.values().tolist()
    if isinstance(col, MapMatrix):
        return col.to_dicts()
    if col.dtype == object:
        return [dict(m) for m in col]
    return col.tolist()


def columns_to_records(cols: EventColumns) -> list[dict[str, Any]]:
    """Turn columns back into one dict per event (the inverse of ``records_to_columns``)."""
    names = list(cols.columns)
    lists = [_to_list(c) for c in cols.columns.values()]
    return (
        [dict(zip(names, row, strict=True)) for row in zip(*lists, strict=True)] if cols.n else []
    )


def concat_columns(parts: Sequence[EventColumns], *, topic: str | None = None,
                   dedupe: bool = True) -> EventColumns:
    """Concatenate events of one topic in order; ``topic`` is needed only when ``parts`` is empty.

    ``dedupe=False`` appends string dictionaries without merging equal values (fast).

    Raises:
        SchemaError: the parts hold different topics or column sets.
    """
    if not parts:
        if topic is None:
            raise SchemaError("concat_columns of no parts needs topic= to know the columns")
        return empty_columns(topic)
    topic = topic or parts[0].topic
    names = list(parts[0].columns)
    for p in parts:
        if p.topic != topic:
            raise SchemaError(f"cannot concatenate topic {p.topic!r} with topic {topic!r}")
        if list(p.columns) != names:
            raise SchemaError(f"cannot concatenate columns {list(p.columns)} with {names}")
    cols: dict[str, Column] = {}
    for name in names:
        first = parts[0].columns[name]
        if isinstance(first, DictColumn):
            cols[name] = DictColumn.concat([p.columns[name] for p in parts],  # type: ignore[misc]
                                           dedupe=dedupe)
        else:
            cols[name] = np.concatenate([p.columns[name] for p in parts])  # type: ignore[misc]
    return EventColumns(topic, sum(p.n for p in parts), cols)


# ---------------------------------------------------------------- batch envelope


def _default_column(spec: _Spec, n: int) -> Column:
    d = spec.info.default
    if spec.wire in ("i64", "i32"):
        return np.full(n, d, dtype=np.int64)
    if spec.wire == "f64":
        return np.full(n, d, dtype=np.float64)
    if spec.wire == "dict_str":
        if d is None:
            return DictColumn(np.full(n, NULL_CODE, np.int32), _object_array([]))
        return DictColumn(np.zeros(n, np.int32), _object_array([d]))
    return _object_array([dict(d) for _ in range(n)])


def _encode_map_matrix(topic: str, spec: _Spec, col: MapMatrix) -> tuple[bytes, list[str]]:
    """The bytes ``_encode_map`` writes for ``col.to_dicts()``, from the matrix."""
    if spec.wire != "map_f64":
        raise EncodeError(f"a MapMatrix holds doubles; this is a map of string to "
                          f"{spec.info.map_values}", topic=topic, field=spec.name)
    bad = next((k for k in col.keys if not isinstance(k, str)), None)
    if bad is not None:
        raise EncodeError(f"bad map key {bad!r}: keys are strings", topic=topic, field=spec.name)
    n, k = col.values.shape
    present = col.present
    lengths = present.sum(axis=1, dtype=np.int64).astype("<i4")
    # codes in first-seen order, row by row (as the dict path assigns them)
    first = (np.where(present.any(axis=0), present.argmax(axis=0) * k + np.arange(k), -1)
             if n else np.full(k, -1))
    used = np.flatnonzero(first >= 0)
    used = used[np.argsort(first[used], kind="stable")]
    code_of = np.full(k, -1, np.int64)
    code_of[used] = np.arange(len(used))
    keys = np.broadcast_to(code_of, (n, k))[present].astype("<i4")
    vals = col.values[present].astype("<f8")
    data = lengths.tobytes() + keys.tobytes() + vals.tobytes()
    return data, [col.keys[j] for j in used.tolist()]


def _encode_map(topic: str, spec: _Spec, col: np.ndarray) -> tuple[bytes, list[str]]:
    checked = _map_column(topic, spec, list(col))
    index: dict[str, int] = {}
    lengths = np.fromiter((len(m) for m in checked), np.int32, len(checked))
    total = int(lengths.sum())
    keys = np.fromiter(
        (index.setdefault(k, len(index)) for m in checked for k in m), np.int32, total
    )
    if spec.wire == "map_f64":
        vals = np.fromiter((v for m in checked for v in m.values()), np.float64, total)
        vbytes = vals.astype("<f8").tobytes()
    else:
        codes = np.fromiter(
            (index.setdefault(v, len(index)) for m in checked for v in m.values()), np.int32, total
        )
        vbytes = codes.astype("<i4").tobytes()
    data = lengths.astype("<i4").tobytes() + keys.astype("<i4").tobytes() + vbytes
    return data, list(index)


def _encode_column(topic: str, spec: _Spec, col: Any, n: int) -> dict[str, Any]:
    name = spec.name
    dictionary: list[str] = []
    if spec.wire == "dict_str":
        _check_dict_column(topic, spec, col, n, EncodeError)
        data = col.codes.astype("<i4", copy=False).tobytes()
        dictionary = col.dictionary.tolist()
    elif isinstance(col, MapMatrix):
        if len(col) != n:
            raise EncodeError(f"column length mismatch: {len(col)} rows, expected ({n},)",
                              topic=topic, field=name)
        data, dictionary = _encode_map_matrix(topic, spec, col)
    elif spec.wire in ("map_f64", "map_str"):
        data, dictionary = _encode_map(topic, spec, col)
    else:
        arr = np.asarray(col)
        if arr.shape != (n,):
            raise EncodeError(
                f"column length mismatch: shape {arr.shape}, expected ({n},)",
                topic=topic,
                field=name,
            )
        if spec.wire == "f64":
            if arr.dtype.kind not in "iuf":
                raise EncodeError(
                    f"expected a numeric array, got dtype {arr.dtype}", topic=topic, field=name
                )
            data = arr.astype("<f8", copy=False).tobytes()
        else:
            if arr.dtype.kind not in "iu":
                raise EncodeError(
                    f"expected an integer array, got dtype {arr.dtype}", topic=topic, field=name
                )
            if spec.wire == "i32" and n and (arr.min() < _INT32_MIN or arr.max() > _INT32_MAX):
                raise EncodeError("value out of int32 range", topic=topic, field=name)
            data = arr.astype("<i4" if spec.wire == "i32" else "<i8", copy=False).tobytes()
    return {"name": name, "kind": spec.wire, "data": data, "dictionary": dictionary}


def encode_batch(cols: EventColumns) -> bytes:
    """Encode ``cols`` as one framed batch message (schema id 100) carrying every field.

    Missing columns whose field has a default are filled with it.

    Raises:
        EncodeError: an unknown, missing or malformed column (the message names it).
    """
    topic, n = cols.topic, cols.n
    specs = _spec_map(topic)
    for name in cols.columns:
        if name not in specs:
            raise EncodeError(
                f"unknown column; the fields of {topic!r} are {', '.join(specs)}",
                topic=topic,
                field=name,
            )
    wire_cols = []
    for spec in specs.values():
        col = cols.columns.get(spec.name)
        if col is None:
            if not spec.info.has_default:
                raise EncodeError("missing required column", topic=topic, field=spec.name)
            col = _default_column(spec, n)
        wire_cols.append(_encode_column(topic, spec, col, n))
    bio = io.BytesIO()
    bio.write(frame(BATCH_SCHEMA_ID, b""))
    schemaless_writer(
        bio, batch_schema().parsed, {"topic": topic, "count": n, "columns": wire_cols}
    )
    return bio.getvalue()


_ACCEPTS: dict[WireKind, tuple[str, ...]] = {
    "i64": ("i64",),
    "i32": ("i32", "i64"),
    "f64": ("f64",),
    "dict_str": ("dict_str",),
    "map_f64": ("map_f64",),
    "map_str": ("map_str",),
}


def _length_error(topic: str, name: str, nbytes: int, itemsize: int, n: int) -> DecodeError:
    return DecodeError(
        f"column length mismatch: {nbytes} bytes hold {nbytes / itemsize:g} values of "
        f"{itemsize} bytes, expected count={n}",
        topic=topic,
        field=name,
    )


def _decode_map(topic: str, spec: _Spec, c: dict[str, Any], n: int) -> np.ndarray:
    data, name = c["data"], spec.name
    vsize = 8 if spec.wire == "map_f64" else 4
    if len(data) < 4 * n:
        raise _length_error(topic, name, len(data), 4, n)
    lengths = np.frombuffer(data, "<i4", count=n)
    if n and lengths.min() < 0:
        raise DecodeError("negative map entry count", topic=topic, field=name)
    total = int(lengths.sum())
    if len(data) != 4 * n + (4 + vsize) * total:
        raise DecodeError(
            f"column length mismatch: {len(data)} bytes, expected {4 * n + (4 + vsize) * total} "
            f"for count={n} maps with {total} entries",
            topic=topic,
            field=name,
        )
    dictionary = _object_array(c["dictionary"])
    key_codes = np.frombuffer(data, "<i4", count=total, offset=4 * n)
    raw_vals = np.frombuffer(
        data, "<f8" if vsize == 8 else "<i4", count=total, offset=4 * (n + total)
    )
    code_arrays = [key_codes] if vsize == 8 else [key_codes, raw_vals]
    for codes in code_arrays:
        if total and (codes.min() < 0 or codes.max() >= len(dictionary)):
            raise DecodeError("code out of dictionary range in map column", topic=topic, field=name)
    keys = dictionary[key_codes].tolist()
    vals = raw_vals.tolist() if vsize == 8 else dictionary[raw_vals].tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    return _object_array(
        [dict(zip(keys[a:b], vals[a:b], strict=True)) for a, b in pairwise(bounds)]
    )


def _decode_column(topic: str, spec: _Spec, c: dict[str, Any], n: int) -> Column:
    kind, data, name = c["kind"], c["data"], spec.name
    if kind not in _ACCEPTS[spec.wire]:
        raise DecodeError(
            f"column kind {kind} does not fit field type {spec.info.type_name}; "
            f"expected {spec.wire}",
            topic=topic,
            field=name,
        )
    if kind in ("i64", "i32", "f64"):
        itemsize = 4 if kind == "i32" else 8
        if len(data) != n * itemsize:
            raise _length_error(topic, name, len(data), itemsize, n)
        arr = np.frombuffer(data, {"i64": "<i8", "i32": "<i4", "f64": "<f8"}[kind])
        return arr.astype(np.int64) if kind == "i32" else arr
    if kind == "dict_str":
        if len(data) != 4 * n:
            raise _length_error(topic, name, len(data), 4, n)
        col = DictColumn(np.frombuffer(data, "<i4"), _object_array(c["dictionary"]))
        _check_dict_column(topic, spec, col, n, DecodeError)
        return col
    return _decode_map(topic, spec, c, n)


def _columns_from_envelope(env: dict[str, Any], topic: str | None) -> EventColumns:
    btopic, n = env["topic"], env["count"]
    if topic is not None and btopic != topic:
        raise DecodeError(
            f"batch carries topic {btopic!r} but was read from topic {topic!r}",
            topic=topic,
            field="topic",
        )
    if not is_event_topic(btopic):
        raise DecodeError(
            f"batch carries unknown topic {btopic!r}; known topics are "
            f"{', '.join(event_topics())}",
            field="topic",
        )
    if n < 0:
        raise DecodeError(f"negative count {n}", topic=btopic, field="count")
    specs = _spec_map(btopic)
    got: dict[str, Column] = {}
    for c in env["columns"]:
        name = c["name"]
        spec = specs.get(name)
        if spec is None:
            raise DecodeError(
                f"unknown column; the fields of {btopic!r} are {', '.join(specs)}",
                topic=btopic,
                field=name,
            )
        if name in got:
            raise DecodeError("duplicate column", topic=btopic, field=name)
        got[name] = _decode_column(btopic, spec, c, n)
    cols: dict[str, Column] = {}
    for name, spec in specs.items():
        if name in got:
            cols[name] = got[name]
        elif spec.info.has_default:
            cols[name] = _default_column(spec, n)
        else:
            raise DecodeError("required column missing from batch", topic=btopic, field=name)
    return EventColumns(btopic, n, cols)


def decode_batch(payload: bytes, *, topic: str | None = None) -> EventColumns:
    """Decode a framed batch message (schema id 100) into columns.

    Raises:
        DecodeError: bad framing, not a batch, a topic other than ``topic``, or an invalid
        column (wrong length, code out of range, missing required column...).
    """
    schema_id = read_header(payload, topic=topic)
    if schema_id != BATCH_SCHEMA_ID:
        raise DecodeError(
            f"schema id {schema_id} ({topic_for_schema_id(schema_id)}) is not a batch: expected "
            f"{BATCH_SCHEMA_ID} (event_batch); use decode_message for single events",
            topic=topic,
            offset=1,
        )
    env = read_body(batch_schema(), payload, topic=topic)
    return _columns_from_envelope(env, topic)


def decode_message(payload: bytes, topic: str) -> EventColumns:
    """Decode a message of ``topic``, single-event or batch, into columns.

    Single events and batches of the same records give equal columns.

    Raises:
        DecodeError: the message is malformed or its schema id does not belong on ``topic``.
    """
    schema_id = read_header(payload, topic=topic)
    check_schema_allowed(schema_id, topic, allow_batch=True)
    if schema_id == BATCH_SCHEMA_ID:
        return _columns_from_envelope(read_body(batch_schema(), payload, topic=topic), topic)
    record = read_body(topic_schema(topic), payload, topic=topic)
    return records_to_columns(topic, [record])


__all__ = [
    "HEADER_SIZE",
    "NULL_CODE",
    "Column",
    "DictColumn",
    "EventColumns",
    "MapMatrix",
    "columns_of",
    "columns_to_records",
    "concat_columns",
    "decode_batch",
    "decode_message",
    "empty_columns",
    "encode_batch",
    "records_to_columns",
]
