"""Load existing event logs (CSV, TSV or Parquet) into Kafka, optionally time-compressed.

``import_events`` reads a file in record batches, maps its columns onto a topic's Avro
fields (a built-in topic or a source declared in the features file), coerces and validates
every row, and produces the valid rows as columnar batch envelopes (schema id 100),
partitioned like the generator: ``crc32(user_id) % partitions`` (``item_id`` on ``items``;
a declared source: its ``user_id``, else its first ``*_id`` string field). Invalid rows are
not sent; each is counted under the reason of its first failing field.

Order: the blocks flow counts an event as late when it is more than the allowed lateness
behind its partition's newest event, so a file in any order would lose most of its events.
By default (``order="time"``) rows are produced in event-time order: a first pass reads the
time column only, counts the rows out of order and keeps a KLL sketch of the times; when
the file has more rows than ``sort_rows`` the rows are spread over time buckets of about that
many rows (the sketch's quantiles), spilled to Arrow IPC files in a temporary directory, and
each bucket is sorted and produced in turn (an external distribution sort; memory holds one
bucket, whatever the file's size). ``order="file"`` keeps file order.

Time handling (``event_ts`` only; other time-like fields are copied as they are):

* ``time_unit`` says how the time column is written: ``ms``, ``s`` (decimals allowed),
  ``us`` (floored to ms) or ``iso`` (ISO-8601 strings, UTC unless an offset is given).
  Parquet ``timestamp`` columns are converted exactly whatever the unit.
* ``compress=X`` plays the history X times faster: ``new = t0 + round((ts - t0) / X)``
  with ``t0`` the time of the first row, in file order, whose time parses. The map is
  monotonic, so event order is kept; ``X < 1`` stretches time instead.
* ``shift_to=T`` then moves everything by one constant so that the latest time in the
  file (after compression) lands exactly on ``T``. This needs a first pass that reads only
  the time column. Rows rejected for another reason still count for that latest time.

Generated event ids are ``f"{id_prefix}{row}"``, ``row`` counting the file's data rows from
0 (rejected rows included), so importing the same file again yields the same ids.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np

from features.errors import TesseraError
from schemas.columnar import DictColumn, EventColumns, encode_batch
from schemas.registry import FieldInfo, event_topics, is_event_topic, topic_schema

TimeUnit = Literal["ms", "s", "us", "iso"]
FileFormat = Literal["csv", "tsv", "parquet"]
ImportOrder = Literal["time", "file"]

_EXTENSIONS: dict[str, FileFormat] = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".csv.bz2": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".tab": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_DELIMITERS = {"csv": ",", "tsv": "\t"}
#: column of a spilled batch holding each row's number in the file (for ids and messages)
_ROW_COLUMN = "__tessera_row"
_INT_RANGE = {"long": (-(2**63), 2**63 - 1), "int": (-(2**31), 2**31 - 1)}
_INT_PATTERN = r"^[+-]?[0-9]{1,18}$"
_DECIMAL_PATTERN = r"^[+-]?[0-9]*\.?[0-9]+$"
_MAX_SAMPLES = 5

__all__ = ["EventImportError", "ImportConfig", "ImportReport", "TimeUnit", "import_events",
           "partition_key"]


class EventImportError(TesseraError, ValueError):
    """An import cannot start: bad configuration, mapping, file, or topic."""


# ---------------------------------------------------------------- config


def partition_key(topic: str) -> str:
    """The field whose hash picks an event's partition: a built-in topic's
    (``tessera.synth.sinks.PARTITION_KEY``); for a declared source ``user_id``, else its first
    string field named ``*_id``, else ``event_id``."""
    from tessera.synth.sinks import PARTITION_KEY

    if topic in PARTITION_KEY:
        return PARTITION_KEY[topic]
    fields = topic_schema(topic).fields
    names = [f.name for f in fields if f.kind == "string" and f.name != "event_id"]
    if "user_id" in names:
        return "user_id"
    return next((n for n in names if n.endswith("_id")), "event_id")


def _file_format(path: Path, given: str | None = None) -> FileFormat:
    if given is not None:
        if given not in get_args(FileFormat):
            raise EventImportError(
                f"file format must be one of {', '.join(get_args(FileFormat))}, got {given!r}")
        return given  # type: ignore[return-value]
    name = path.name.lower()
    for ext, fmt in sorted(_EXTENSIONS.items(), key=lambda kv: -len(kv[0])):
        if name.endswith(ext):
            return fmt
    raise EventImportError(
        f"unsupported file type {path.name!r}: expected one of {', '.join(_EXTENSIONS)}; "
        "name the format with --format csv|tsv|parquet"
    )


def _coerce_default(topic: str, info: FieldInfo, value: Any) -> Any:
    """Return ``value`` as the Python type of ``info`` (strings from the CLI are parsed)."""
    where = f"default for field {info.name!r} of topic {topic!r}"
    if value is None:
        if info.nullable:
            return None
        raise EventImportError(f"{where}: the field is not nullable, got None")
    if info.kind in _INT_RANGE:
        try:
            out = int(value) if isinstance(value, str) else value
        except ValueError:
            out = None
        if not isinstance(out, int) or isinstance(out, bool):
            raise EventImportError(f"{where}: expected an integer, got {value!r}")
        lo, hi = _INT_RANGE[info.kind]
        if not lo <= out <= hi:
            raise EventImportError(f"{where}: expected an integer in [{lo}, {hi}], got {out}")
        return out
    if info.kind in ("string", "enum"):
        out = str(value)
        if info.symbols is not None and out not in info.symbols:
            raise EventImportError(f"{where}: {out!r} is not one of {', '.join(info.symbols)}")
        return out
    raise EventImportError(f"{where}: {info.type_name} fields cannot take a constant default")


@dataclass(frozen=True, kw_only=True)
class ImportConfig:
    """What to import and how: validated when made.

    Args:
        path: a ``.csv`` (optionally ``.gz``/``.bz2``) or ``.parquet``/``.pq`` file.
        topic: the event topic whose schema the rows follow (also the Kafka topic).
        mapping: Avro field <- source column. Fields not mapped take the same-named column
            when the file has one.
        time_column: the column holding event time (default: the column mapped to
            ``event_ts``). Setting it maps ``event_ts`` to it.
        time_unit: how that column is written (see the module docstring).
        compress: time compression factor (> 0); 10 plays the history 10x faster.
        shift_to: epoch ms at which the (compressed) history should end.
        defaults: constant values for fields the file lacks (strings are parsed to ints).
        id_prefix: prefix of generated event ids when the file has no ``event_id``
            (default ``"import-<file stem>-"``).
        batch_events: events per Kafka message.
        read_rows: rows per record batch read from the file.
        format: ``csv``, ``tsv`` or ``parquet`` (default: from the file name).
        header: whether a CSV/TSV file starts with a header line.
        columns: the column names of a file without a header, in file order.
        order: ``time`` (default) produces rows in event-time order; ``file`` as written.
        sort_rows: rows sorted in memory at once; a larger file is sorted in buckets.

    Raises:
        EventImportError: an unknown topic or field, a field both mapped and defaulted, a
            bad default, time unit, factor or batch size, or an unsupported file type.
    """

    path: Path
    topic: str
    mapping: Mapping[str, str] = field(default_factory=dict)
    time_column: str | None = None
    time_unit: TimeUnit = "ms"
    compress: float | None = None
    shift_to: int | None = None
    defaults: Mapping[str, Any] = field(default_factory=dict)
    id_prefix: str | None = None
    batch_events: int = 1000
    read_rows: int = 65_536
    format: FileFormat | None = None
    header: bool = True
    columns: tuple[str, ...] | None = None
    order: ImportOrder = "time"
    sort_rows: int = 5_000_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if not is_event_topic(self.topic):
            raise EventImportError(
                f"unknown topic {self.topic!r}: events can be imported into "
                f"{', '.join(event_topics())}; declare a source for other events in the "
                "features file (sources:) and pass it with --features"
            )
        if self.order not in get_args(ImportOrder):
            raise EventImportError(
                f"order must be one of {', '.join(get_args(ImportOrder))}, got {self.order!r}")
        fmt = _file_format(self.path, self.format)
        if self.columns is not None:
            object.__setattr__(self, "columns", tuple(self.columns))
            if fmt == "parquet":
                raise EventImportError("column names (--columns) are for CSV/TSV files without "
                                       "a header; a Parquet file names its columns")
            if self.header:
                raise EventImportError("column names (--columns) are for files without a header "
                                       "line; add --no-header, or leave --columns out")
            if len(set(self.columns)) != len(self.columns) or not all(self.columns):
                raise EventImportError(f"--columns must be distinct, non-empty names, got "
                                       f"{','.join(self.columns)!r}")
        elif not self.header and fmt != "parquet":
            raise EventImportError("a file without a header needs its column names: "
                                   "--columns user_id,item_id,rating,ts")
        schema = topic_schema(self.topic)
        fields = {f.name: f for f in schema.fields}
        allowed = ", ".join(fields)
        mapping = dict(self.mapping)
        if self.time_column is not None:
            mapped = mapping.get("event_ts")
            if mapped is not None and mapped != self.time_column:
                raise EventImportError(
                    f"event_ts is mapped to column {mapped!r} but time_column is "
                    f"{self.time_column!r}; give only one of them"
                )
            mapping["event_ts"] = self.time_column
        for name, column in mapping.items():
            if name not in fields:
                raise EventImportError(
                    f"cannot map column {column!r} to field {name!r}: topic {self.topic!r} "
                    f"has no such field; its fields are {allowed}"
                )
            if fields[name].kind == "map":
                raise EventImportError(
                    f"cannot map column {column!r} to field {name!r}: map fields cannot be "
                    "imported; leave it out to get its default"
                )
        defaults: dict[str, Any] = {}
        for name, value in dict(self.defaults).items():
            if name not in fields:
                raise EventImportError(
                    f"cannot set a default for field {name!r}: topic {self.topic!r} has no "
                    f"such field; its fields are {allowed}"
                )
            if name in mapping:
                raise EventImportError(
                    f"field {name!r} is both mapped to column {mapping[name]!r} and given a "
                    "default; drop one of them"
                )
            defaults[name] = _coerce_default(self.topic, fields[name], value)
        if "event_ts" in defaults and (self.compress is not None or self.shift_to is not None):
            raise EventImportError("a constant event_ts cannot be compressed or shifted")
        if self.time_unit not in get_args(TimeUnit):
            raise EventImportError(
                f"time_unit must be one of {', '.join(get_args(TimeUnit))}, got {self.time_unit!r}"
            )
        if self.compress is not None and not (
            isinstance(self.compress, (int, float))
            and np.isfinite(self.compress)
            and self.compress > 0
        ):
            raise EventImportError(
                f"compress must be a finite number > 0 (10 = ten times faster), "
                f"got {self.compress!r}"
            )
        if self.shift_to is not None and (
            not isinstance(self.shift_to, int) or isinstance(self.shift_to, bool)
        ):
            raise EventImportError(f"shift_to must be epoch milliseconds, got {self.shift_to!r}")
        for name in ("batch_events", "read_rows", "sort_rows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise EventImportError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "mapping", mapping)
        object.__setattr__(self, "defaults", defaults)
        if self.id_prefix is None:
            object.__setattr__(self, "id_prefix", f"import-{_stem(self.path)}-")

    @property
    def file_format(self) -> FileFormat:
        return _file_format(self.path, self.format)


def _stem(path: Path) -> str:
    name = path.name
    for ext in sorted(_EXTENSIONS, key=len, reverse=True):
        if name.lower().endswith(ext):
            return name[: -len(ext)]
    return path.stem


# ---------------------------------------------------------------- report


@dataclass
class ImportReport:
    """What an import did; updated as it goes (``progress`` sees it after every batch).

    ``rejected_reasons`` counts each rejected row once, under its first failing field;
    ``samples`` holds a few rejected rows as ``row N: reason: value``. ``min_ts`` and
    ``max_ts`` span the produced events (after compression and shift).
    """

    rows: int = 0
    produced: int = 0
    out_of_order: int = 0
    buckets: int = 0
    rejected: int = 0
    rejected_reasons: Counter[str] = field(default_factory=Counter)
    min_ts: int | None = None
    max_ts: int | None = None
    seconds: float = 0.0
    messages: int = 0
    samples: list[str] = field(default_factory=list)

    @property
    def events_per_s(self) -> float:
        return self.produced / self.seconds if self.seconds > 0 else 0.0


# ---------------------------------------------------------------- reading


def _text_options(config: ImportConfig, fmt: FileFormat, block_size: int | None = None
                  ) -> dict[str, Any]:
    import pyarrow.csv as pcsv

    read = pcsv.ReadOptions(column_names=list(config.columns) if config.columns else None,
                            **({"block_size": block_size} if block_size else {}))
    # quoting off for TSV: a tab-separated log writes quotes as data
    parse = pcsv.ParseOptions(delimiter=_DELIMITERS[fmt], quote_char='"' if fmt == "csv" else False)
    return {"read_options": read, "parse_options": parse}


def _read_batches(
    config: ImportConfig, rows: int, columns: list[str] | None = None
) -> Iterator[Any]:
    """Yield ``pyarrow.RecordBatch`` es of the file; CSV/TSV columns are all read as strings."""
    path, fmt = config.path, config.file_format
    if fmt == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(path) as pf:
            yield from pf.iter_batches(batch_size=rows, columns=columns)
        return
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = _source_columns(config)
    convert = pcsv.ConvertOptions(
        column_types={n: pa.string() for n in names}, include_columns=columns
    )
    # ~rows lines a block for typical logs; the reader never holds more than a block or two.
    opts = _text_options(config, fmt, max(1 << 16, rows * 128))
    with pcsv.open_csv(path, convert_options=convert, **opts) as reader:
        yield from reader


def _source_columns(config: ImportConfig) -> list[str]:
    """Return the column names of the file (the Parquet footer, ``columns``, or the header)."""
    if config.file_format == "parquet":
        import pyarrow.parquet as pq

        with pq.ParquetFile(config.path) as pf:
            return list(pf.schema_arrow.names)
    if config.columns:
        return list(config.columns)
    import pyarrow.csv as pcsv

    with pcsv.open_csv(config.path, **_text_options(config, config.file_format)) as reader:
        return list(reader.schema.names)


# ---------------------------------------------------------------- coercion


def _int64(arr: Any) -> tuple[Any, Any]:
    """Return ``(int64 values with 0 for bad rows, mask of rows that hold an integer)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_integer(t):
        ok = pc.is_valid(arr)
        if pa.types.is_uint64(t):
            ok = pc.and_(ok, pc.less_equal(arr, pa.scalar(2**63 - 1, pa.uint64())))
        return pc.if_else(ok, arr, 0).cast(pa.int64(), safe=False), ok
    if pa.types.is_floating(t):
        ok = pc.and_(pc.is_finite(arr), pc.equal(pc.floor(arr), arr))
        ok = pc.and_(ok, pc.less(pc.abs(arr), 2.0**63))
        ok = pc.fill_null(ok, False)
        return pc.if_else(ok, arr, 0.0).cast(pa.int64(), safe=False), ok
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr)
        ok = pc.fill_null(pc.match_substring_regex(s, _INT_PATTERN), False)
        return pc.if_else(ok, s, "0").cast(pa.int64()), ok
    return pa.nulls(len(arr), pa.int64()).fill_null(0), pa.array(np.zeros(len(arr), bool))


def _float64(arr: Any) -> tuple[Any, Any]:
    """Return ``(float64 values with 0 for bad rows, mask of rows that hold a finite number)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    t = arr.type
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        s = pc.utf8_trim_whitespace(arr)
        ok = pc.fill_null(pc.match_substring_regex(s, _DECIMAL_PATTERN), False)
        vals = pc.if_else(ok, s, "0").cast(pa.float64())
    elif pa.types.is_integer(t) or pa.types.is_floating(t):
        vals = arr.cast(pa.float64())
        ok = pc.fill_null(pc.is_finite(vals), False)
    else:
        return pa.array(np.zeros(len(arr))), pa.array(np.zeros(len(arr), bool))
    return pc.if_else(ok, vals, 0.0), ok


def _iso_ms(arr: Any) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa
    import pyarrow.compute as pc

    if not (pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type)):
        return np.zeros(len(arr), np.int64), np.zeros(len(arr), bool)
    s = pc.utf8_trim_whitespace(arr)
    try:  # fast path: every value has a zone (Z or +hh:mm)
        ts = pc.cast(s, pa.timestamp("ms", tz="UTC")).cast(pa.int64())
        ok = pc.is_valid(ts)
        return pc.fill_null(ts, 0).to_numpy(), ok.to_numpy(zero_copy_only=False)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    values = s.to_pylist()
    out = np.zeros(len(values), np.int64)
    good = np.zeros(len(values), bool)
    for i, v in enumerate(values):
        if not v:
            continue
        try:
            dt = datetime.fromisoformat(v.replace("Z", "+00:00"))
        except ValueError:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        out[i] = round(dt.timestamp() * 1000)
        good[i] = True
    return out, good


def _times_ms(arr: Any, unit: TimeUnit) -> tuple[np.ndarray, np.ndarray]:
    """Parse a time column into ``(epoch ms, ok mask)`` numpy arrays."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if pa.types.is_timestamp(arr.type):
        ok = pc.is_valid(arr).to_numpy(zero_copy_only=False)
        tz = arr.type.tz
        ms = arr.cast(pa.timestamp("ms", tz=tz), safe=False).cast(pa.int64())
        return pc.fill_null(ms, 0).to_numpy(), ok
    if unit == "iso":
        return _iso_ms(arr)
    ints, int_ok = _int64(arr)
    ints_np = ints.to_numpy()
    ok_np = int_ok.to_numpy(zero_copy_only=False).astype(bool)
    out = np.zeros(len(arr), np.int64)
    if unit == "ms":
        out[ok_np] = ints_np[ok_np]
    elif unit == "s":
        big = np.abs(ints_np) > (2**63 - 1) // 1000
        ok_np &= ~big
        out[ok_np] = ints_np[ok_np] * 1000
    else:  # us
        out[ok_np] = ints_np[ok_np] // 1000
    # Decimals (1700000000.25 s) where the integer parse failed.
    floats, float_ok = _float64(arr)
    dec = float_ok.to_numpy(zero_copy_only=False).astype(bool) & ~ok_np
    if dec.any():
        scale = {"ms": 1.0, "s": 1000.0, "us": 0.001}[unit]
        f = floats.to_numpy()[dec] * scale
        fits = np.abs(f) < 2.0**62
        idx = np.flatnonzero(dec)[fits]
        out[idx] = np.floor(f[fits] + 0.5).astype(np.int64)
        ok_np[idx] = True
    return out, ok_np


def _strings(arr: Any) -> tuple[Any, np.ndarray]:
    """Return ``(string array, mask of empty-or-null rows)``; numbers become their text."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    arr = arr.cast(pa.string())
    empty = pc.fill_null(pc.equal(pc.utf8_length(arr), 0), True)
    return arr, empty.to_numpy(zero_copy_only=False).astype(bool)


def _dict_column(arr: Any) -> DictColumn:
    import pyarrow.compute as pc

    enc = pc.dictionary_encode(arr)
    codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False).astype(np.int32)
    dictionary = np.empty(len(enc.dictionary), dtype=object)
    dictionary[:] = enc.dictionary.to_pylist()
    return DictColumn(codes, dictionary)


def _constant(info: FieldInfo, value: Any, n: int) -> Any:
    if info.kind in _INT_RANGE:
        return np.full(n, value, np.int64)
    if value is None:
        return DictColumn(np.full(n, -1, np.int32), np.empty(0, dtype=object))
    dictionary = np.empty(1, dtype=object)
    dictionary[0] = value
    return DictColumn(np.zeros(n, np.int32), dictionary)


# ---------------------------------------------------------------- the import


@dataclass(frozen=True)
class _Plan:
    """Which source column feeds each field; built once the file's columns are known."""

    columns: dict[str, str]  # field -> source column
    generate_ids: bool


def _plan(config: ImportConfig, source: list[str]) -> _Plan:
    schema = topic_schema(config.topic)
    have = set(source)
    listed = ", ".join(source)
    for name, column in config.mapping.items():
        if column not in have:
            raise EventImportError(
                f"field {name!r} is mapped to column {column!r}, but {config.path.name} has "
                f"no such column; its columns are {listed}"
            )
    columns: dict[str, str] = {}
    for f in schema.fields:
        if f.name in config.mapping:
            columns[f.name] = config.mapping[f.name]
        elif f.name not in config.defaults and f.name in have and f.kind != "map":
            columns[f.name] = f.name
    generate_ids = "event_id" in topic_schema(config.topic).field_names and (
        "event_id" not in columns and "event_id" not in config.defaults
    )
    for f in schema.fields:
        if f.name in columns or f.name in config.defaults or f.has_default:
            continue
        if f.name == "event_id" and generate_ids:
            continue
        raise EventImportError(
            f"field {f.name!r} of topic {config.topic!r} is required, but {config.path.name} "
            f"has no column {f.name!r}; map one with --map {f.name}=COLUMN (mapping="
            f"{{{f.name!r}: COLUMN}}) or give --default {f.name}=VALUE; its columns are {listed}"
        )
    return _Plan(columns, generate_ids)


class _TimeMap:
    """``ts -> t0 + round((ts - t0) / compress) + offset``, with ``t0`` the first time seen."""

    def __init__(self, compress: float | None, t0: int | None = None, offset: int = 0):
        self.compress = compress
        self.t0 = t0
        self.offset = offset

    def __call__(self, ts: np.ndarray, ok: np.ndarray) -> np.ndarray:
        if self.compress is None:
            return ts + self.offset if self.offset else ts
        if self.t0 is None:
            if not ok.any():
                return ts
            self.t0 = int(ts[np.flatnonzero(ok)[0]])
        rel = np.rint((ts - self.t0).astype(np.float64) / self.compress).astype(np.int64)
        return self.t0 + rel + self.offset


@dataclass
class _TimePass:
    """What a first pass over the time column found (memory flat in the file's size)."""

    tmap: _TimeMap
    rows: int  # rows of the file
    out_of_order: int  # rows earlier than a row before them
    bounds: np.ndarray  # time bucket boundaries of an external sort (empty: one bucket)


def _time_pass(config: ImportConfig, column: str) -> _TimePass:
    """Read the time column only: the time map (with ``shift_to``'s offset), the rows out of
    order (against the running maximum), and, for files over ``sort_rows``, bucket
    boundaries at the quantiles of a KLL sketch (DataSketches) of the times: about
    ``sort_rows`` rows a bucket, without holding every time."""
    import datasketches

    tmap = _TimeMap(config.compress)
    sketch = datasketches.kll_doubles_sketch(400)
    rows, behind, high = 0, 0, None
    for batch in _read_batches(config, config.read_rows, [column]):
        ts, ok = _times_ms(batch.column(0), config.time_unit)
        rows += len(ts)
        valid = tmap(ts, ok)[ok]
        if not len(valid):
            continue
        running = np.maximum.accumulate(valid)
        prior = np.empty_like(valid)
        prior[0] = valid[0] if high is None else high
        prior[1:] = running[:-1] if high is None else np.maximum(running[:-1], high)
        behind += int(np.count_nonzero(valid < prior))
        high = int(running[-1]) if high is None else max(high, int(running[-1]))
        sketch.update(valid.astype(np.float64))
    offset = 0
    if config.shift_to is not None and high is not None:
        offset = config.shift_to - high
        tmap = _TimeMap(config.compress, tmap.t0, offset)
    bounds = np.zeros(0, np.int64)
    if rows > config.sort_rows and not sketch.is_empty():
        buckets = -(-rows // config.sort_rows)
        cuts = sketch.get_quantiles([i / buckets for i in range(1, buckets)])
        bounds = np.unique(np.asarray(cuts, dtype=np.int64)) + offset
    return _TimePass(tmap, rows, behind, bounds)


def _coerce_batch(
    config: ImportConfig,
    plan: _Plan,
    batch: Any,
    row_numbers: np.ndarray,
    tmap: _TimeMap,
    report: ImportReport,
) -> EventColumns | None:
    """Turn one record batch into valid events; count the rejected rows in ``report``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    schema = topic_schema(config.topic)
    n = batch.num_rows
    reasons: list[str] = []
    reason_idx = np.full(n, -1, np.int32)
    raw_values: dict[int, Any] = {}

    def reject(bad: np.ndarray, reason: str, source: Any) -> None:
        fresh = bad & (reason_idx < 0)
        if fresh.any():
            raw_values[len(reasons)] = source
            reason_idx[fresh] = len(reasons)
            reasons.append(reason)

    built: dict[str, Any] = {}
    for f in schema.fields:
        column = plan.columns.get(f.name)
        if column is None:
            if f.name in config.defaults:
                built[f.name] = ("const", config.defaults[f.name])
            elif f.name == "event_id" and plan.generate_ids:
                rows = pa.array(np.asarray(row_numbers, dtype=np.int64))
                built[f.name] = (
                    "arrow",
                    pc.binary_join_element_wise(config.id_prefix, rows.cast(pa.string()), ""),
                )
            continue
        src = batch.column(batch.schema.get_field_index(column))
        if f.name == "event_ts":
            ts, ok = _times_ms(src, config.time_unit)
            reject(~ok, f"event_ts: not a time in {config.time_unit} (column {column!r})", src)
            built[f.name] = ("np", tmap(ts, ok))
        elif f.kind in _INT_RANGE:
            vals, ok = _int64(
                src if not pa.types.is_dictionary(src.type) else src.dictionary_decode()
            )
            vals_np = vals.to_numpy()
            ok_np = ok.to_numpy(zero_copy_only=False).astype(bool)
            _, empty = _strings(src)
            if f.has_default:
                vals_np = np.where(empty, f.default, vals_np)
                ok_np |= empty
            else:
                reject(empty, f"{f.name}: missing (column {column!r})", src)
            reject(~ok_np, f"{f.name}: not an integer (column {column!r})", src)
            lo, hi = _INT_RANGE[f.kind]
            reject((vals_np < lo) | (vals_np > hi), f"{f.name}: out of {f.kind} range", src)
            built[f.name] = ("np", vals_np)
        elif f.kind in ("double", "float"):
            vals, ok = _float64(
                src if not pa.types.is_dictionary(src.type) else src.dictionary_decode()
            )
            _, empty = _strings(src)
            reject(empty, f"{f.name}: missing (column {column!r})", src)
            reject(~ok.to_numpy(zero_copy_only=False).astype(bool),
                   f"{f.name}: not a number (column {column!r})", src)
            built[f.name] = ("f64", vals.to_numpy(zero_copy_only=False))
        elif f.kind in ("string", "enum"):
            strs, empty = _strings(src)
            if f.has_default:
                strs = pc.if_else(pa.array(empty), pa.scalar(f.default, pa.string()), strs)
            else:
                reject(empty, f"{f.name}: missing (column {column!r})", src)
            if f.symbols is not None:
                valid = (
                    pc.fill_null(pc.is_in(strs, value_set=pa.array(f.symbols)), False)
                    .to_numpy(zero_copy_only=False)
                    .astype(bool)
                )
                reject(~valid, f"{f.name}: not one of {', '.join(f.symbols)}", src)
            built[f.name] = ("arrow", strs)

    ok_rows = reason_idx < 0
    bad_rows = np.flatnonzero(~ok_rows)
    if len(bad_rows):
        report.rejected += len(bad_rows)
        codes, counts = np.unique(reason_idx[bad_rows], return_counts=True)
        for code, count in zip(codes.tolist(), counts.tolist(), strict=True):
            report.rejected_reasons[reasons[code]] += count
        for i in bad_rows[: _MAX_SAMPLES - len(report.samples)].tolist():
            value = raw_values[int(reason_idx[i])][i].as_py()
            report.samples.append(
                f"row {int(row_numbers[i])}: {reasons[reason_idx[i]]}: {value!r}")
    keep = np.flatnonzero(ok_rows)
    if not len(keep):
        return None
    cols: dict[str, Any] = {}
    take = pa.array(keep)
    for name, (how, value) in built.items():
        info = schema.field(name)
        if how == "const":
            cols[name] = _constant(info, value, len(keep))
        elif how == "np":
            cols[name] = np.ascontiguousarray(value[keep], dtype=np.int64)
        elif how == "f64":
            cols[name] = np.ascontiguousarray(value[keep], dtype=np.float64)
        else:
            cols[name] = _dict_column(value.take(take))
    return EventColumns(config.topic, len(keep), cols)


def import_events(
    config: ImportConfig,
    bootstrap: str,
    *,
    partitions: int | None = None,
    create_topic: bool = False,
    progress: Callable[[ImportReport], None] | None = None,
    producer_config: Mapping[str, Any] | None = None,
    flush_timeout_s: float = 120.0,
    clock: Callable[[], float] = time.monotonic,
) -> ImportReport:
    """Stream ``config.path`` into Kafka topic ``config.topic`` as columnar batches.

    Args:
        config: what to import.
        bootstrap: Kafka bootstrap servers.
        partitions: partitions of the topic when ``create_topic`` creates it (default 4);
            rows are always spread over the topic's actual partitions.
        create_topic: create the topic if it does not exist.
        progress: called with the running report after each record batch.
        producer_config: librdkafka settings over the generator's bulk settings.
        flush_timeout_s: how long the final flush may take.
        clock: monotonic clock (for tests).

    Returns:
        The report: rows read, produced, rejected (by reason), time span, seconds.

    Raises:
        EventImportError: the file is missing or unreadable, the mapping does not fit its
            columns, or the topic does not exist and ``create_topic`` is false.
        SinkError: delivery failed.
    """
    import pyarrow as pa

    from tessera.synth.sinks import _Producer, compact, ensure_topics, partitions_of
    from tessera.topics import list_topics

    path = config.path
    if not path.is_file():
        raise EventImportError(
            f"file {str(path)!r} does not exist"
            if not path.exists()
            else f"{str(path)!r} is not a file"
        )
    fmt = config.file_format
    try:
        source = _source_columns(config)
    except (pa.ArrowInvalid, OSError) as exc:
        raise EventImportError(f"cannot read {fmt} file {str(path)!r}: {exc}") from exc
    plan = _plan(config, source)

    known = list_topics(bootstrap)
    if config.topic not in known and not create_topic:
        raise EventImportError(
            f"topic {config.topic!r} does not exist at {bootstrap}; create it with "
            f"`tessera topics create {config.topic}` or pass --create-topic"
        )
    n_parts = ensure_topics(
        bootstrap, [config.topic], partitions=partitions or 4, create=create_topic
    )[config.topic]

    report = ImportReport()
    t_start = clock()
    tmap = _TimeMap(config.compress)
    time_column = plan.columns.get("event_ts")
    timing: _TimePass | None = None
    try:
        if time_column is not None:  # also in file order: the report counts rows out of order
            timing = _time_pass(config, time_column)
            tmap = timing.tmap
            report.out_of_order = timing.out_of_order
    except pa.ArrowInvalid as exc:
        raise EventImportError(f"cannot read {fmt} file {str(path)!r}: {exc}") from exc

    producer = _Producer(bootstrap, producer_config)
    key_field = partition_key(config.topic)
    wanted = sorted(set(plan.columns.values()))

    def tick() -> None:
        if progress is not None:
            report.seconds = clock() - t_start
            progress(report)

    def emit(batch: Any, row_numbers: np.ndarray, sort: bool) -> None:
        cols = _coerce_batch(config, plan, batch, row_numbers, tmap, report)
        if cols is not None:
            if sort:
                ts = np.asarray(cols.columns["event_ts"])
                cols = cols.take(np.argsort(ts, kind="stable"))
            _produce(cols, producer, config, n_parts, key_field, report, partitions_of, compact)
        if progress is not None:
            report.seconds = clock() - t_start
            progress(report)

    try:
        if timing is None or config.order == "file":
            for batch in _read_batches(config, config.read_rows, wanted):
                rows = np.arange(report.rows, report.rows + batch.num_rows, dtype=np.int64)
                report.rows += batch.num_rows
                emit(batch, rows, sort=False)
        else:
            _import_sorted(config, wanted, time_column, timing, report, emit, tick)
    except pa.ArrowInvalid as exc:
        raise EventImportError(
            f"cannot read {fmt} file {str(path)!r} after row {report.rows}: {exc}"
        ) from exc
    producer.flush(flush_timeout_s)
    report.seconds = clock() - t_start
    return report


def _one_batch(table: Any) -> Any:
    """A table's rows as one ``RecordBatch``."""
    import pyarrow as pa

    return pa.RecordBatch.from_arrays([c.combine_chunks() for c in table.columns],
                                      names=table.column_names)


def _import_sorted(config: ImportConfig, wanted: list[str], time_column: str,
                   timing: _TimePass, report: ImportReport,
                   emit: Callable[[Any, np.ndarray, bool], None],
                   tick: Callable[[], None]) -> None:
    """Produce the file in event-time order: in memory when it fits ``sort_rows``, else
    bucket by time (``timing.bounds``) into spill files (Arrow IPC) and sort one bucket at a
    time."""
    import tempfile

    import pyarrow as pa

    bounds = timing.bounds
    report.buckets = len(bounds) + 1
    if not len(bounds):
        parts, numbers = [], []
        for batch in _read_batches(config, config.read_rows, wanted):
            numbers.append(np.arange(report.rows, report.rows + batch.num_rows, dtype=np.int64))
            report.rows += batch.num_rows
            parts.append(batch)
        if parts:
            emit(_one_batch(pa.Table.from_batches(parts)), np.concatenate(numbers), True)
        return
    with tempfile.TemporaryDirectory(prefix="tessera-import-") as tmp:
        writers: dict[int, Any] = {}
        paths: dict[int, Path] = {}
        try:
            for batch in _read_batches(config, config.read_rows, wanted):
                n = batch.num_rows
                numbers = np.arange(report.rows, report.rows + n, dtype=np.int64)
                ts, ok = _times_ms(batch.column(batch.schema.get_field_index(time_column)),
                                   config.time_unit)
                mapped = np.where(ok, timing.tmap(ts, ok), np.iinfo(np.int64).min)
                bucket = np.searchsorted(bounds, mapped, side="right")
                report.rows += n
                with_rows = batch.append_column(_ROW_COLUMN, pa.array(numbers))
                for b in np.unique(bucket).tolist():
                    part = with_rows.take(pa.array(np.flatnonzero(bucket == b)))
                    if b not in writers:
                        paths[b] = Path(tmp) / f"bucket-{b:06d}.arrow"
                        writers[b] = pa.ipc.new_stream(str(paths[b]), part.schema)
                    writers[b].write_batch(part)
                tick()
        finally:
            for w in writers.values():
                w.close()
        for b in sorted(paths):
            with pa.ipc.open_stream(str(paths[b])) as reader:
                table = reader.read_all().combine_chunks()
            numbers = table.column(_ROW_COLUMN).to_numpy()
            emit(_one_batch(table.drop_columns([_ROW_COLUMN])), numbers, True)
            paths[b].unlink()


def _produce(
    cols: EventColumns,
    producer: Any,
    config: ImportConfig,
    n_parts: int,
    key_field: str,
    report: ImportReport,
    partitions_of: Callable[..., np.ndarray],
    compact: Callable[[EventColumns], EventColumns],
) -> None:
    """Produce ``cols`` as batches of up to ``batch_events``, one partition per message."""
    key_col = cols.columns[key_field]
    part = partitions_of(key_col, n_parts)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(n_parts + 1))
    for p in range(n_parts):
        rows = order[bounds[p] : bounds[p + 1]]
        for s in range(0, len(rows), config.batch_events):
            value = encode_batch(compact(cols.take(rows[s : s + config.batch_events])))
            producer.produce(config.topic, value, partition=p, key=None)
            report.messages += 1
    report.produced += cols.n
    ts = cols.columns.get("event_ts")
    if ts is not None and cols.n:
        lo, hi = int(np.min(ts)), int(np.max(ts))
        report.min_ts = lo if report.min_ts is None else min(report.min_ts, lo)
        report.max_ts = hi if report.max_ts is None else max(report.max_ts, hi)
