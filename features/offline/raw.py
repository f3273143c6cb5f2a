"""Raw event tables on Iceberg: every Kafka event of every topic, with its offsets as checkpoint.

One table per event topic, ``raw_<topic>`` (``raw_views``, ``raw_engagements``,
``raw_impressions``, ``raw_items``), in the namespace of an :class:`OfflineTables`. Columns:

* every field of the topic's Avro schema, in schema order: ``string`` -> string, ``long`` ->
  long, ``int`` -> int, ``double`` -> double, ``enum`` -> string (the symbol), map fields (the
  impressions' ``model_versions``, ``scores``, ``features``) -> native Iceberg
  ``map<string, string>`` / ``map<string, double>`` (pyiceberg and pyarrow write and read them
  directly, and Spark/Trino/DuckDB query them as maps, so no JSON strings);
  ``["null", T]`` fields are optional columns, the others required;
* ``_partition int`` and ``_offset long``: where the event was read (the Kafka message offset;
  a columnar batch message carries many events, which share its offset);
* ``event_date date`` and ``event_hour int``: UTC date and hour of ``event_ts``.

Partitioned by ``identity(event_date), identity(event_hour)``. Dates and hours are derived
columns (not ``day(event_ts)``) for the reason given in :mod:`features.offline.tables`: our
times are epoch-millisecond longs, and Iceberg's time transforms need timestamp columns.

Exactly-once checkpoint: :meth:`RawTables.append` writes a micro-batch in ONE Iceberg commit
whose snapshot summary carries ``tessera.offset.<p>`` = the next offset to read, for EVERY
partition of the topic archived so far (the previous archive snapshot's offsets merged with
this batch's). Events and offsets become visible atomically; a reader that resumes from
:meth:`RawTables.committed_offsets` neither skips nor repeats an event. A commit that would
move a partition's offset backwards, or that was prepared against offsets another writer has
since changed (``expected_offsets``), is refused with :class:`OffsetConflictError` instead of
writing duplicates or gaps.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import BooleanExpression
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (
    DateType,
    DoubleType,
    IcebergType,
    IntegerType,
    LongType,
    MapType,
    NestedField,
    StringType,
)

from features.offline.maintenance import COMMITS, MARKED_PREFIX
from features.offline.tables import (
    OfflineTableError,
    OfflineTables,
    _and_all,
    _commit_lock,
    _days_column,
    _range_predicates,
)
from schemas.columnar import DictColumn, EventColumns
from schemas.registry import FieldInfo, event_topics, is_event_topic, topic_schema

__all__ = [
    "META_COLUMNS",
    "OFFSET_PROPERTY_PREFIX",
    "OffsetConflictError",
    "RawTables",
    "raw_schema",
    "raw_table_name",
]

#: Snapshot summary key prefix of the committed offsets: ``tessera.offset.<partition>``.
OFFSET_PROPERTY_PREFIX = f"{MARKED_PREFIX}offset."
#: Columns added after the topic's fields.
META_COLUMNS: tuple[str, ...] = ("_partition", "_offset", "event_date", "event_hour")

_MS_PER_HOUR = 3_600_000
_SIMPLE: dict[str, IcebergType] = {
    "string": StringType(),
    "enum": StringType(),
    "long": LongType(),
    "int": IntegerType(),
    "double": DoubleType(),
}
_MAP_VALUES: dict[str, IcebergType] = {"double": DoubleType(), "string": StringType()}


class OffsetConflictError(OfflineTableError):
    """A raw-table commit disagrees with the offsets another writer committed."""

    def __init__(self, topic: str, partition: int, committed: int | None, detail: str):
        self.topic = topic
        self.partition = partition
        self.committed = committed
        super().__init__(
            f"raw_{topic}: partition {partition} is committed at offset {committed}, {detail}; "
            "another archive writer owns this partition (a second archive process on the same "
            "warehouse, or a zombie of a restarted one): stop it and restart this one"
        )


def raw_table_name(topic: str) -> str:
    """Return the table name of ``topic``'s raw events: ``raw_<topic>``."""
    _check_topic(topic)
    return f"raw_{topic}"


def _check_topic(topic: str) -> None:
    if not is_event_topic(topic):
        raise OfflineTableError(
            f"unknown topic {topic!r}; raw tables exist for {list(event_topics())} (a source "
            "declared in a features file counts once that file is loaded: pass --features)")


def _field_type(topic: str, info: FieldInfo, next_id: list[int]) -> IcebergType:
    if info.kind == "map" and info.map_values in _MAP_VALUES:
        key_id, value_id = next_id[0], next_id[0] + 1
        next_id[0] += 2
        return MapType(key_id, StringType(), value_id, _MAP_VALUES[info.map_values],
                       value_required=True)
    if info.kind in _SIMPLE:
        return _SIMPLE[info.kind]
    raise OfflineTableError(
        f"field {info.name!r} of topic {topic!r} has type {info.type_name}, which raw tables do "
        f"not map; supported: {sorted(_SIMPLE)} and maps of string or double"
    )


def raw_schema(topic: str) -> Schema:
    """Return the Iceberg schema of ``raw_<topic>``: the topic's fields, then META_COLUMNS."""
    _check_topic(topic)
    infos = topic_schema(topic).fields
    # Field ids 1..n for top-level columns; map key/value ids after them (pyiceberg reassigns
    # fresh ids at table creation anyway, they only need to be unique here).
    n_top = len(infos) + len(META_COLUMNS)
    next_id = [n_top + 1]
    fields = [
        NestedField(i, f.name, _field_type(topic, f, next_id), required=not f.nullable)
        for i, f in enumerate(infos, start=1)
    ]
    k = len(infos)
    fields += [
        NestedField(k + 1, "_partition", IntegerType(), required=True),
        NestedField(k + 2, "_offset", LongType(), required=True),
        NestedField(k + 3, "event_date", DateType(), required=True),
        NestedField(k + 4, "event_hour", IntegerType(), required=True),
    ]
    return Schema(*fields)


def _raw_spec(schema: Schema) -> PartitionSpec:
    return PartitionSpec(
        PartitionField(source_id=schema.find_field("event_date").field_id, field_id=1000,
                       transform=IdentityTransform(), name="event_date"),
        PartitionField(source_id=schema.find_field("event_hour").field_id, field_id=1001,
                       transform=IdentityTransform(), name="event_hour"),
    )


def _offsets_of(snapshot: Snapshot) -> dict[int, int] | None:
    """The ``tessera.offset.*`` of a snapshot's summary; None if it carries none."""
    if snapshot.summary is None:
        return None
    props = snapshot.summary.additional_properties
    out = {
        int(k[len(OFFSET_PROPERTY_PREFIX):]): int(v)
        for k, v in props.items()
        if k.startswith(OFFSET_PROPERTY_PREFIX)
    }
    return out or None


# ---------------------------------------------------------------- columns <-> arrow


def _string_array(col: DictColumn, typ: pa.DataType) -> pa.Array:
    codes = np.asarray(col.codes, dtype=np.int32)
    mask = codes < 0
    indices = pa.array(codes, type=pa.int32(), mask=mask if mask.any() else None)
    dictionary = pa.array(col.dictionary.tolist(), type=typ)
    return pa.DictionaryArray.from_arrays(indices, dictionary).cast(typ)


def _map_array(col: np.ndarray, typ: pa.MapType) -> pa.Array:
    maps = col.tolist()
    lengths = np.fromiter((len(m) for m in maps), np.int32, len(maps))
    offsets = np.zeros(len(maps) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    keys = pa.array([k for m in maps for k in m], type=typ.key_type)
    items = pa.array([v for m in maps for v in m.values()], type=typ.item_type)
    return pa.MapArray.from_arrays(pa.array(offsets), keys, items, type=typ)


def _to_arrow(
    schema: pa.Schema, cols: EventColumns, partition_ids: np.ndarray, offsets: np.ndarray
) -> pa.Table:
    arrays: list[pa.Array] = []
    for f in schema:
        if f.name in META_COLUMNS:
            break
        c = cols.columns[f.name]
        if isinstance(c, DictColumn):
            arrays.append(_string_array(c, f.type))
        elif pa.types.is_map(f.type):
            arrays.append(_map_array(c, f.type))
        else:
            arrays.append(pa.array(np.asarray(c), type=f.type))
    ts = np.asarray(cols.columns["event_ts"], dtype=np.int64)
    arrays += [
        pa.array(np.asarray(partition_ids, dtype=np.int32), type=pa.int32()),
        pa.array(np.asarray(offsets, dtype=np.int64), type=pa.int64()),
        _days_column(pa.array(ts, type=pa.int64())),
        pa.array((ts // _MS_PER_HOUR % 24).astype(np.int32), type=pa.int32()),
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


#: the order of a topic's raw events everywhere they are read: event time, then where in
#: Kafka each was read (a ``last_n`` list depends on it)
EVENT_ORDER = [("event_ts", "ascending"), ("_partition", "ascending"), ("_offset", "ascending")]


def scan_fields(columns: Iterable[str] | None) -> list[str] | None:
    """The raw table columns to read for event fields ``columns``: them and the columns of
    :data:`EVENT_ORDER` (None: every column)."""
    if columns is None:
        return None
    return sorted({*columns, *(c for c, _ in EVENT_ORDER)})


def events_from_arrow(topic: str, data: pa.Table) -> EventColumns:
    """Rows of ``raw_<topic>`` (any subset of them, any subset of its columns) as
    :class:`EventColumns` in :data:`EVENT_ORDER`: what :meth:`RawTables.scan_columns` returns
    for the same rows and columns."""
    if data.num_rows > 1:
        data = data.sort_by(EVENT_ORDER)
    return _from_arrow(topic, data)


def _from_arrow(topic: str, data: pa.Table) -> EventColumns:
    cols: dict[str, Any] = {}
    present = set(data.column_names)
    for info in topic_schema(topic).fields:
        if info.name not in present:  # a scan of some columns only
            continue
        col = data.column(info.name).combine_chunks()
        if info.kind in ("string", "enum"):
            enc = pc.dictionary_encode(col)
            codes = pc.fill_null(enc.indices, -1).to_numpy(zero_copy_only=False)
            dictionary = np.empty(len(enc.dictionary), dtype=object)
            dictionary[:] = enc.dictionary.to_pylist()
            cols[info.name] = DictColumn(codes.astype(np.int32), dictionary)
        elif info.kind == "map":
            maps = np.empty(len(col), dtype=object)
            maps[:] = [dict(m) for m in col.to_pylist()]
            cols[info.name] = maps
        elif info.kind in ("double", "float"):
            cols[info.name] = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
        else:
            cols[info.name] = col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return EventColumns(topic, data.num_rows, cols)


# ---------------------------------------------------------------- tables


class RawTables:
    """The ``raw_<topic>`` Iceberg tables beside an :class:`OfflineTables` (same catalog).

    Thread-safe like :class:`OfflineTables`: appends to one table are serialized by the same
    process-wide lock and retried on ``CommitFailedException``; each retry re-reads the
    latest offsets and merges again.
    """

    def __init__(self, offline: OfflineTables):
        """Create the raw tables in ``offline``'s catalog and namespace if missing.

        Raises:
            OfflineTableError: a table exists with other columns, or the catalog fails.
        """
        self.offline = offline
        self._tables: dict[str, Table] = {}
        self._arrow: dict[str, pa.Schema] = {}
        for topic in event_topics():
            self._ensure(topic)

    def _ensure(self, topic: str) -> Table:
        """The table of ``topic``, created or loaded on first use (a declared source's table
        is made when a process that declared it first needs it)."""
        table = self._tables.get(topic)
        if table is not None:
            return table
        _check_topic(topic)
        try:
            schema = raw_schema(topic)
            table = self.offline._create_or_load(raw_table_name(topic), schema,
                                                 _raw_spec(schema))
        except OfflineTableError:
            raise
        except Exception as exc:
            raise OfflineTableError(
                f"could not open raw_{topic} in namespace {self.offline.namespace!r}: {exc}"
            ) from exc
        self._arrow[topic] = table.schema().as_arrow()
        self._tables[topic] = table
        return table

    @classmethod
    def open(cls, warehouse: str | Path, **kwargs: Any) -> RawTables:
        """Open (creating if needed) the raw tables under ``warehouse``.

        ``kwargs`` go to :meth:`OfflineTables.open` (``catalog_uri``, ``namespace``, ...).
        """
        return cls(OfflineTables.open(warehouse, **kwargs))

    def table(self, topic: str) -> Table:
        """Return the pyiceberg table of ``topic``'s raw events, refreshed."""
        return self._ensure(topic).refresh()

    # -- offsets ------------------------------------------------------------------

    @staticmethod
    def _latest_offsets(table: Table) -> dict[int, int]:
        # Walk back past snapshots that carry no offsets (compaction, deletes by other tools).
        for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
            offsets = _offsets_of(snapshot)
            if offsets is not None:
                return offsets
        return {}

    def committed_offsets(self, topic: str) -> dict[int, int]:
        """Return ``{partition: next offset to read}`` of the latest archive commit.

        Partitions never committed are absent (read them from the beginning).
        """
        return self._latest_offsets(self.table(topic))

    # -- append -------------------------------------------------------------------

    def append(
        self,
        topic: str,
        columns: EventColumns,
        partition_ids: np.ndarray,
        offsets: np.ndarray,
        next_offsets: Mapping[int, int],
        *,
        expected_offsets: Mapping[int, int | None] | None = None,
        reset_partitions: Iterable[int] = (),
    ) -> int:
        """Append one micro-batch and its consumed offsets in one Iceberg commit.

        Args:
            topic: the event topic.
            columns: the batch's events.
            partition_ids, offsets: Kafka partition and message offset of each event.
            next_offsets: ``{partition: next offset to read}`` for the partitions this batch
                consumed (also those whose messages were all dead letters: ``columns`` may be
                empty). Merged over the previous commit's offsets of every other partition.
            expected_offsets: ``{partition: offset or None}`` this writer believes committed
                for each partition of ``next_offsets`` (None: never committed). When given,
                the commit is refused if another writer moved one of them.
            reset_partitions: partitions whose Kafka log was reset (the broker restarted
                empty): their offsets may move back.

        Returns:
            The number of rows written.

        Raises:
            OffsetConflictError: an offset would move backwards (outside
                ``reset_partitions``), or moved under us.
            OfflineTableError: bad columns, or too many lost commit races.
        """
        self._ensure(topic)
        if columns.topic != topic:
            raise OfflineTableError(f"columns hold topic {columns.topic!r}, not {topic!r}")
        if len(partition_ids) != columns.n or len(offsets) != columns.n:
            raise OfflineTableError(
                f"partition_ids ({len(partition_ids)}) and offsets ({len(offsets)}) must have "
                f"one value per event ({columns.n})"
            )
        if not next_offsets:
            raise OfflineTableError("next_offsets is empty: a commit must record its offsets")
        try:
            data = _to_arrow(self._arrow[topic], columns, partition_ids, offsets)
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, KeyError) as exc:
            raise OfflineTableError(f"bad {topic} columns for raw_{topic}: {exc}") from exc
        required = [f.name for f in self._arrow[topic] if not f.nullable]
        nulls = [n for n in required if data.column(n).null_count]
        if nulls:
            raise OfflineTableError(f"bad {topic} columns: required column(s) {nulls} hold nulls")
        ident = f"{self.offline.namespace}.{raw_table_name(topic)}"
        table = self._tables[topic]
        off = self.offline
        with _commit_lock(off._catalog_key, ident):
            table.refresh()
            for attempt in range(off._retries + 1):
                previous = self._latest_offsets(table)
                self._check_offsets(topic, previous, next_offsets, expected_offsets,
                                    reset_partitions)
                merged = {**previous, **{int(p): int(o) for p, o in next_offsets.items()}}
                props = {f"{OFFSET_PROPERTY_PREFIX}{p}": str(o) for p, o in sorted(merged.items())}
                try:
                    table.append(data, snapshot_properties=props)
                    COMMITS.after_commit(table)
                    return data.num_rows
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == off._retries:
                        raise OfflineTableError(
                            f"append to {ident!r} lost {attempt + 1} commit races to other "
                            f"writers: {exc}; retry later or raise commit_retries"
                        ) from exc
                    time.sleep(off._backoff_s * (2**attempt))
                    table.refresh()
        raise AssertionError("unreachable")  # pragma: no cover

    @staticmethod
    def _check_offsets(
        topic: str,
        previous: Mapping[int, int],
        next_offsets: Mapping[int, int],
        expected: Mapping[int, int | None] | None,
        resets: Iterable[int] = (),
    ) -> None:
        resets = {int(p) for p in resets}
        for p, o in next_offsets.items():
            have = previous.get(int(p))
            if expected is not None and have != expected.get(p):
                raise OffsetConflictError(
                    topic, int(p), have, f"but this writer expected {expected.get(p)}"
                )
            if have is not None and int(o) < have and int(p) not in resets:
                raise OffsetConflictError(
                    topic, int(p), have, f"and this commit would move it back to {o}"
                )

    # -- scans --------------------------------------------------------------------

    def scan(
        self,
        topic: str,
        from_ts: int | None = None,
        to_ts: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> pa.Table:
        """Return the raw events with ``from_ts <= event_ts < to_ts`` (either bound optional).

        Partitions are pruned by ``event_date``. Rows come in no particular order.

        Args:
            columns: the columns to return (default: all).
        """
        table = self.table(topic)
        selected: tuple[str, ...] = ("*",) if columns is None else tuple(columns)
        return table.scan(row_filter=self.scan_filter(from_ts, to_ts),
                          selected_fields=selected).to_arrow()

    def scan_filter(self, from_ts: int | None = None, to_ts: int | None = None
                    ) -> BooleanExpression:
        """The Iceberg row filter of :meth:`scan` (``from_ts <= event_ts < to_ts``, with
        partition pruning by ``event_date``), for an engine that scans the table itself."""
        return _and_all(_range_predicates("event_ts", "event_date", from_ts, to_ts))

    def scan_columns(
        self, topic: str, from_ts: int | None = None, to_ts: int | None = None,
        columns: Iterable[str] | None = None,
    ) -> EventColumns:
        """Return the raw events of ``[from_ts, to_ts)`` as :class:`EventColumns`.

        The same columnar type the streaming path decodes (strings and enums as
        ``DictColumn``, integers int64, maps as object arrays of dicts), sorted by
        ``(event_ts, _partition, _offset)``; only the fields in ``columns`` (default: all).
        """
        return events_from_arrow(topic, self.scan(topic, from_ts, to_ts,
                                                  scan_fields(columns)))

    def count_rows(self, topic: str) -> int:
        """Return the rows of ``raw_<topic>`` from its snapshot summary (no data read)."""
        snapshot = self.table(topic).current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return 0
        return int(snapshot.summary.get("total-records", "0") or 0)
