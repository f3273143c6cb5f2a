"""Offline (Iceberg) tables of sealed blocks and late events, over pyiceberg.

The embedded default is a SQL catalog in a SQLite file beside a local warehouse
directory; production passes any pyiceberg catalog config (REST, Glue, Hive,
SQL on Postgres) and an object-store warehouse. The tables are plain Iceberg,
readable by Spark, Trino or DuckDB.

Tables (in the namespace given to :meth:`OfflineTables.open`, ``tessera`` by default):

``blocks``
    One row per sealed block: ``entity_type, entity_id, feature_key, start_ms,
    size_ms, rep, written_ms`` plus ``start_day`` (date of ``start_ms``, UTC).
    Partitioned by ``identity(size_ms)`` and ``identity(start_day)``.

``late_events``
    One row per event that arrived after its block was sealed: ``topic,
    partition, offset, event_ts, event_id, payload, detected_ms`` plus
    ``event_day`` (date of ``event_ts``, UTC). Partitioned by ``identity(event_day)``.

Why a ``*_day`` date column instead of ``day(start)``: Iceberg's ``day``
transform applies to date/timestamp columns only, and our times are epoch
milliseconds (``long``). A derived date column with an identity partition
needs no timestamp column, no transform support at write time, and any engine
can filter on it; the scans here add the matching ``*_day`` predicate so
partitions are pruned.

The streaming writers append exactly once: each marked commit records how far
its writer got (sealed blocks: a watermark per shard; late events: an offset per
partition), and a replay after a crash leaves out what the marks cover. A block
may still be written again by another writer (a batch correction, a replay of
the feature), so :meth:`OfflineTables.scan_blocks` returns each block key once
(the row with the latest ``written_ms``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.expressions import (
    AlwaysTrue,
    And,
    BooleanExpression,
    EqualTo,
    GreaterThanOrEqual,
    In,
    LessThan,
    LessThanOrEqual,
    Or,
)
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import (
    BinaryType,
    DateType,
    IntegerType,
    LongType,
    NestedField,
    StringType,
)

from features.errors import TesseraError
from features.offline.maintenance import (
    COMMITS,
    MARKED_PREFIX,
    TABLE_PROPERTIES,
    ensure_properties,
)

__all__ = [
    "BLOCKS_SCHEMA",
    "BLOCK_KEY",
    "LATE_EVENTS_SCHEMA",
    "LATE_EVENT_KEY",
    "BlockRow",
    "LateEventRow",
    "OfflineTableError",
    "OfflineTables",
    "TableName",
]

TableName = Literal["blocks", "late_events"]
TABLE_NAMES: tuple[TableName, ...] = ("blocks", "late_events")

_MS_PER_DAY = 86_400_000
_EPOCH = dt.date(1970, 1, 1)


class OfflineTableError(TesseraError):
    """An offline table could not be opened, written or read as asked."""


class BlockRow(NamedTuple):
    """One sealed block to append (a plain 6-tuple in this order works too)."""

    entity_type: str
    entity_id: str
    feature_key: str
    start_ms: int
    size_ms: int
    rep: bytes


class LateEventRow(NamedTuple):
    """One late event to append (a plain 7-tuple in this order works too).

    ``payload`` is the re-encoded event (Confluent-framed Avro bytes).
    """

    topic: str
    partition: int
    offset: int
    event_ts: int
    event_id: str
    payload: bytes
    detected_ms: int


BLOCKS_SCHEMA = Schema(
    NestedField(1, "entity_type", StringType(), required=True),
    NestedField(2, "entity_id", StringType(), required=True),
    NestedField(3, "feature_key", StringType(), required=True),
    NestedField(4, "start_ms", LongType(), required=True),
    NestedField(5, "size_ms", LongType(), required=True),
    NestedField(6, "rep", BinaryType(), required=True),
    NestedField(7, "written_ms", LongType(), required=True),
    NestedField(8, "start_day", DateType(), required=True),
)
BLOCKS_SPEC = PartitionSpec(
    PartitionField(source_id=5, field_id=1000, transform=IdentityTransform(), name="size_ms"),
    PartitionField(source_id=8, field_id=1001, transform=IdentityTransform(), name="start_day"),
)
BLOCK_KEY = ("entity_type", "entity_id", "feature_key", "start_ms", "size_ms")
_BLOCK_COLUMNS = (
    "entity_type",
    "entity_id",
    "feature_key",
    "start_ms",
    "size_ms",
    "rep",
    "written_ms",
)

LATE_EVENTS_SCHEMA = Schema(
    NestedField(1, "topic", StringType(), required=True),
    NestedField(2, "partition", IntegerType(), required=True),
    NestedField(3, "offset", LongType(), required=True),
    NestedField(4, "event_ts", LongType(), required=True),
    NestedField(5, "event_id", StringType(), required=True),
    NestedField(6, "payload", BinaryType(), required=True),
    NestedField(7, "detected_ms", LongType(), required=True),
    NestedField(8, "event_day", DateType(), required=True),
)
LATE_EVENTS_SPEC = PartitionSpec(
    PartitionField(source_id=8, field_id=1000, transform=IdentityTransform(), name="event_day"),
)
LATE_EVENT_KEY = ("topic", "partition", "offset", "event_id")
_LATE_COLUMNS = ("topic", "partition", "offset", "event_ts", "event_id", "payload", "detected_ms")

_TABLES: dict[str, tuple[Schema, PartitionSpec]] = {
    "blocks": (BLOCKS_SCHEMA, BLOCKS_SPEC),
    "late_events": (LATE_EVENTS_SCHEMA, LATE_EVENTS_SPEC),
}

# One lock per (catalog, table) for the whole process, so two OfflineTables over
# the same catalog serialize their commits instead of racing and retrying.
_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def _commit_lock(catalog_key: str, identifier: str) -> threading.Lock:
    with _LOCKS_GUARD:
        return _LOCKS.setdefault((catalog_key, identifier), threading.Lock())


def _day(ms: int) -> dt.date:
    return _EPOCH + dt.timedelta(days=ms // _MS_PER_DAY)


def _days_column(ms: pa.Array) -> pa.Array:
    """Return the UTC date of each epoch-millisecond value (floor division)."""
    days = pc.floor(pc.divide(pc.cast(ms, pa.float64()), float(_MS_PER_DAY)))
    return pc.cast(pc.cast(days, pa.int32()), pa.date32())


def dedupe_latest(table: pa.Table, key: Sequence[str], version: str) -> pa.Table:
    """Keep one row per ``key``: the one with the largest ``version``; sort by ``key``
    (what every scan of an at-least-once table returns)."""
    if table.num_rows <= 1:
        return table
    order = [(k, "ascending") for k in key] + [(version, "descending")]
    table = table.sort_by(order)
    # A row starts a new key iff some key column differs from the row above it.
    new_key = None
    for k in key:
        col = table.column(k).combine_chunks()
        differs = pc.not_equal(col.slice(1), col.slice(0, len(col) - 1))
        new_key = differs if new_key is None else pc.or_(new_key, differs)
    keep = pa.concat_arrays([pa.array([True]), new_key])
    return table.filter(keep)


#: snapshot summary properties of the late-events writers: ``tessera.late.<writer>.<topic>:<p>``
LATE_MARK_PREFIX = f"{MARKED_PREFIX}late."
#: snapshot summary properties of the sealed-block writers: ``tessera.sealed.<writer>.<shard>``
#: (the shard's watermark: every block of the shard ending by it is in the table)
SEALED_MARK_PREFIX = f"{MARKED_PREFIX}sealed."


def _marks_of(table: Table, prefix: str) -> dict[str, int]:
    """The marks under ``prefix`` of the newest snapshot carrying any (compactions and batch
    replacements carry none), as ``{"<writer>.<what>": value}``. Each marked commit carries
    every writer's marks forward, so the newest marked snapshot holds them all."""
    from pyiceberg.table.snapshots import ancestors_of

    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        props = snapshot.summary.additional_properties if snapshot.summary is not None else {}
        marks = {k[len(prefix):]: int(v) for k, v in props.items() if k.startswith(prefix)}
        if marks:
            return marks
    return {}


def _writer_marks(marks: Mapping[str, int], writer: str | None) -> dict[str, int]:
    """``marks`` of one ``writer``, without its prefix (all of them when ``writer`` is None)."""
    if writer is None:
        return dict(marks)
    head = f"{writer}."
    return {k[len(head):]: v for k, v in marks.items() if k.startswith(head)}


def _merged_marks(table: Table, prefix: str, writer: str, newest: Mapping[str, int],
                  restarted: Iterable[str] = ()) -> dict[str, str]:
    """The summary properties of a marked commit: the table's marks under ``prefix`` with
    ``writer``'s ``newest`` raised in (replacing those named in ``restarted``)."""
    merged = {f"{prefix}{k}": v for k, v in _marks_of(table, prefix).items()}
    restarted = {f"{prefix}{writer}.{p}" for p in restarted}
    for what, v in newest.items():
        k = f"{prefix}{writer}.{what}"
        merged[k] = v if k in restarted else max(merged.get(k, v), v)
    return {k: str(v) for k, v in sorted(merged.items())}


def _as_array(values: Any, typ: pa.DataType) -> pa.Array | pa.ChunkedArray:
    """``values`` (a Python sequence or an Arrow column) as an Arrow array of ``typ`` (a
    column stays chunked: its chunks are not copied into one)."""
    if isinstance(values, pa.ChunkedArray):
        return values if values.type == typ else values.cast(typ)
    if isinstance(values, pa.Array):
        return values.cast(typ)
    return pa.array(values, typ)


def _check_no_nulls(data: pa.Table, what: str) -> None:
    """Raise if a column has nulls (``from_arrays`` does not enforce non-nullable fields)."""
    nulls = [
        name for name, col in zip(data.column_names, data.columns, strict=True) if col.null_count
    ]
    if nulls:
        raise OfflineTableError(
            f"bad {what} rows: column(s) {nulls} contain None; every field is required"
        )


def _and_all(predicates: Iterable[BooleanExpression]) -> BooleanExpression:
    expr: BooleanExpression = AlwaysTrue()
    for p in predicates:
        expr = p if isinstance(expr, AlwaysTrue) else And(expr, p)
    return expr


def _range_predicates(
    column: str, day_column: str, start: int | None, end: int | None
) -> list[BooleanExpression]:
    """Half-open ``start <= column < end`` plus the matching day predicates for pruning."""
    preds: list[BooleanExpression] = []
    if start is not None:
        preds += [
            GreaterThanOrEqual(column, int(start)),
            GreaterThanOrEqual(day_column, _day(int(start)).isoformat()),
        ]
    if end is not None:
        preds += [
            LessThan(column, int(end)),
            # end is exclusive: the last millisecond that can match is end - 1.
            LessThan(day_column, (_day(int(end) - 1) + dt.timedelta(days=1)).isoformat()),
        ]
    return preds


def create_concurrently(create: Callable[[], Any], attempts: int = 8,
                        backoff_s: float = 0.05) -> Any:
    """Run an idempotent catalog ``create_*_if_not_exists`` that other processes may race.

    Two workers starting together both see "missing" and both insert; the loser's insert
    fails (a SQL catalog raises a unique-constraint error, not "already exists"). Retrying
    then finds the winner's object. Returns what ``create`` returns; re-raises after
    ``attempts`` failures.
    """
    for attempt in range(attempts):
        try:
            return create()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(backoff_s * (attempt + 1))
    raise AssertionError("unreachable")


class OfflineTables:
    """The ``blocks`` and ``late_events`` Iceberg tables of one catalog namespace.

    Thread-safe: appends to a table are serialized by a process-wide lock per
    (catalog, table) and retried on ``CommitFailedException`` (a writer in
    another process committed first). Each append is exactly one Iceberg
    commit, so callers should batch rows (thousands per call), not append one
    block at a time.
    """

    def __init__(
        self,
        catalog: Catalog,
        *,
        namespace: str = "tessera",
        catalog_key: str | None = None,
        commit_retries: int = 5,
        retry_backoff_s: float = 0.05,
        clock_ms: Callable[[], int] = lambda: time.time_ns() // 1_000_000,
    ):
        """Wrap an opened pyiceberg ``catalog``; create the namespace and tables if missing.

        Prefer :meth:`open`. ``catalog_key`` names the catalog in the process-wide
        commit locks (defaults to the catalog's name and ``uri`` property).
        """
        if commit_retries < 0:
            raise OfflineTableError(f"commit_retries must be >= 0, got {commit_retries}")
        self.catalog = catalog
        self.namespace = namespace
        self._catalog_key = catalog_key or f"{catalog.name}|{catalog.properties.get('uri', '')}"
        self._retries = commit_retries
        self._backoff_s = retry_backoff_s
        self._clock_ms = clock_ms
        self._tables: dict[str, Table] = {}
        try:
            create_concurrently(lambda: catalog.create_namespace_if_not_exists(namespace))
            for name, (schema, spec) in _TABLES.items():
                self._tables[name] = self._create_or_load(name, schema, spec)
        except OfflineTableError:
            raise
        except Exception as exc:
            raise OfflineTableError(
                f"could not open the offline tables in namespace {namespace!r} of catalog "
                f"{catalog.name!r}: {exc}; check the catalog uri and warehouse"
            ) from exc

    @classmethod
    def open(
        cls,
        warehouse: str | Path,
        *,
        catalog_uri: str | None = None,
        namespace: str = "tessera",
        catalog_properties: Mapping[str, Any] | None = None,
        catalog_name: str = "tessera",
        **kwargs: Any,
    ) -> OfflineTables:
        """Open (creating if needed) the offline tables under ``warehouse``.

        Args:
            warehouse: a local directory (created if missing) or an object-store
                URL such as ``s3://bucket/tessera``.
            catalog_uri: SQL catalog URL; defaults to ``sqlite:///{warehouse}/catalog.db``
                for a local warehouse. Ignored when ``catalog_properties`` is given.
            namespace: the Iceberg namespace holding the tables.
            catalog_properties: a full pyiceberg catalog config (``type``, ``uri``,
                credentials, ...) for production; passed to ``load_catalog`` with
                ``warehouse`` added unless the config sets its own.
            catalog_name: the catalog's name.
            **kwargs: passed to the constructor (``commit_retries``, ``clock_ms``, ...).

        Raises:
            OfflineTableError: the catalog cannot be opened or the tables created.
        """
        warehouse_str = str(warehouse)
        local = "://" not in warehouse_str
        if local:
            path = Path(warehouse).expanduser().resolve()
            path.mkdir(parents=True, exist_ok=True)
            location = path.as_uri()
        else:
            path = None
            location = warehouse_str
        try:
            if catalog_properties is not None:
                props = {"warehouse": location, **dict(catalog_properties)}
                catalog: Catalog = create_concurrently(lambda: load_catalog(catalog_name,
                                                                            **props))
            else:
                if catalog_uri is None:
                    if path is None:
                        raise OfflineTableError(
                            f"warehouse {warehouse_str!r} is not a local directory, so there is no "
                            "default SQLite catalog; pass catalog_uri= or catalog_properties="
                        )
                    catalog_uri = f"sqlite:///{path / 'catalog.db'}"
                uri = catalog_uri  # the SQL catalog creates its own tables on first open
                catalog = create_concurrently(
                    lambda: SqlCatalog(catalog_name, uri=uri, warehouse=location))
        except OfflineTableError:
            raise
        except Exception as exc:
            raise OfflineTableError(
                f"could not open catalog {catalog_name!r} for warehouse {warehouse_str!r}: {exc}"
            ) from exc
        return cls(catalog, namespace=namespace, **kwargs)

    # -- tables -----------------------------------------------------------------

    @property
    def catalog_config(self) -> dict[str, Any]:
        """What ``pyiceberg.catalog.load_catalog`` needs to open this catalog in another
        process (``name`` included): how a distributed engine's workers reach the tables."""
        props = dict(self.catalog.properties)
        if isinstance(self.catalog, SqlCatalog):
            props.setdefault("type", "sql")
        return {"name": self.catalog.name, **props}

    def identifier(self, name: str) -> str:
        """The namespaced identifier of table ``name`` (``tessera.blocks``)."""
        return self._identifier(name)

    def _identifier(self, name: str) -> str:
        return f"{self.namespace}.{name}"

    def _create_or_load(self, name: str, schema: Schema, spec: PartitionSpec) -> Table:
        ident = self._identifier(name)
        try:
            table = self.catalog.load_table(ident)
        except NoSuchTableError:
            table = create_concurrently(lambda: self.catalog.create_table_if_not_exists(
                ident, schema=schema, partition_spec=spec, properties=TABLE_PROPERTIES
            ))
        table = ensure_properties(table)
        have = [f.name for f in table.schema().fields]
        want = [f.name for f in schema.fields]
        if have != want:
            raise OfflineTableError(
                f"table {ident!r} has columns {have}, expected {want}; "
                "it was created by another version of Tessera: migrate it or use another namespace"
            )
        return table

    def table(self, name: TableName) -> Table:
        """Return the pyiceberg table ``name``, refreshed to the latest snapshot."""
        if name not in self._tables:
            raise OfflineTableError(f"unknown table {name!r}; expected one of {list(TABLE_NAMES)}")
        return self._tables[name].refresh()

    def _append(self, name: str, data: pa.Table,
                properties: Callable[[Table], dict[str, str]] | None = None) -> None:
        """Append ``data`` to table ``name`` in one commit, retrying lost commit races.

        ``properties(table)``: snapshot summary properties of the commit, computed from the
        table as refreshed for each attempt (marks carried forward from other writers).
        """
        if data.num_rows == 0:
            return
        table = self._tables[name]
        with _commit_lock(self._catalog_key, self._identifier(name)):
            # Another OfflineTables (or process) may have committed since our last look;
            # refreshing first avoids writing data files for a commit that must fail.
            table.refresh()
            for attempt in range(self._retries + 1):
                try:
                    if properties is None:
                        table.append(data)
                    else:
                        table.append(data, snapshot_properties=properties(table))
                    COMMITS.after_commit(table)
                    return
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == self._retries:
                        raise OfflineTableError(
                            f"append to {self._identifier(name)!r} lost {attempt + 1} commit races "
                            f"to other writers: {exc}; retry later or raise commit_retries"
                        ) from exc
                    time.sleep(self._backoff_s * (2**attempt))
                    table.refresh()

    # -- blocks -----------------------------------------------------------------

    def append_blocks(
        self,
        rows: Sequence[BlockRow | tuple[str, str, str, int, int, bytes]],
        written_ms: int | Sequence[int] | None = None,
        *,
        writer: str | None = None,
        sealed_through: Mapping[str, int] | None = None,
    ) -> int:
        """Append sealed blocks in one Iceberg commit; return the number of rows written.

        Args:
            rows: ``(entity_type, entity_id, feature_key, start_ms, size_ms, rep)`` tuples.
            written_ms: the write time stamped on every row (defaults to the clock), or one
                per row. A block appended twice is returned once by :meth:`scan_blocks`:
                the row with the latest stamp.
            writer, sealed_through: a streaming flow (``writer``) records in the same commit,
                per shard, the watermark through which every block it sealed is now in the
                table (``{shard: watermark}``, raised, never lowered; see
                :meth:`sealed_marks`). A replay after a crash leaves out the blocks these
                marks cover, so each sealed block is on disk once.
        """
        if not rows:
            return 0
        marks_for = None
        if writer is not None and sealed_through:
            newest = dict(sealed_through)

            def marks_for(table: Table) -> dict[str, str]:
                return _merged_marks(table, SEALED_MARK_PREFIX, writer, newest)
        data = self._block_data(rows, written_ms)
        self._append("blocks", data, marks_for)
        return data.num_rows

    def sealed_marks(self, writer: str | None = None) -> dict[str, int]:
        """``{"<writer>.<shard>": watermark}``: per streaming writer and shard, the watermark
        through which every block the shard sealed is in the table (one writer's only,
        without the prefix, if given). A block of that shard ending at or before its mark
        is committed; after a crash, the writer leaves such blocks out."""
        table = self._tables["blocks"].refresh()
        return _writer_marks(_marks_of(table, SEALED_MARK_PREFIX), writer)

    def replace_blocks(
        self,
        feature_key: str,
        start_from: int,
        start_to: int,
        rows: Sequence[BlockRow | tuple[str, str, str, int, int, bytes]] | pa.Table,
        written_ms: int | None = None,
        *,
        sizes: Sequence[int],
    ) -> int:
        """Replace the blocks of ``feature_key`` of the given ``sizes`` that lie inside
        ``[start_from, start_to)`` (``start >= start_from`` and ``start + size <= start_to``)
        by ``rows``, in one Iceberg commit (readers never see the range empty); return the
        rows written.

        A block that starts inside the range but ends after it (a roll-up the range cuts)
        is kept: a range's job cannot recompute it, and a live flow may have sealed it.
        A concurrent writer (a live blocks flow appending what it seals) can add files the
        delete must cover; the whole replacement is then retried on the new snapshot.
        """

        data = self._block_data(rows, written_ms) if len(rows) else None
        if data is not None:
            start = data.column("start_ms")
            size = data.column("size_ms")
            ok = pc.and_(pc.is_in(size, pa.array([int(s) for s in sizes], pa.int64())),
                         pc.and_(pc.greater_equal(start, int(start_from)),
                                 pc.less_equal(pc.add(start, size), int(start_to))))
            if not pc.all(ok).as_py():
                i = pc.index(ok, False).as_py()
                raise OfflineTableError(
                    f"block ({data.column('entity_id')[i].as_py()!r}, start "
                    f"{start[i].as_py()}, size {size[i].as_py()}) is not a block of sizes "
                    f"{list(sizes)} inside [{start_from}, {start_to}); the replacement would "
                    "not cover it"
                )
        inside: BooleanExpression | None = None
        for size in sorted({int(s) for s in sizes}):
            one = And(EqualTo("size_ms", size),
                      And(GreaterThanOrEqual("start_ms", int(start_from)),
                          LessThanOrEqual("start_ms", int(start_to) - size)))
            inside = one if inside is None else Or(inside, one)
        if inside is None:
            raise OfflineTableError("replace_blocks needs at least one block size")
        where = And(EqualTo("feature_key", feature_key), inside)
        table = self._tables["blocks"]
        with _commit_lock(self._catalog_key, self._identifier("blocks")):
            table.refresh()
            for attempt in range(self._retries + 1):
                try:
                    with warnings.catch_warnings():  # "did not match any records"
                        warnings.simplefilter("ignore", UserWarning)
                        with table.transaction() as tx:
                            tx.delete(where)
                            if data is not None:
                                tx.append(data)
                    COMMITS.after_commit(table)
                    return 0 if data is None else data.num_rows
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == self._retries:
                        raise OfflineTableError(
                            f"replacing {feature_key!r} blocks in {self._identifier('blocks')!r} "
                            f"lost {attempt + 1} commit races to other writers: {exc}; retry "
                            "later or raise commit_retries"
                        ) from exc
                    time.sleep(self._backoff_s * (2**attempt))
                    table.refresh()
        raise AssertionError("unreachable")

    def _block_data(
        self,
        rows: Sequence[BlockRow | tuple[str, str, str, int, int, bytes]],
        written_ms: int | Sequence[int] | None,
    ) -> pa.Table:
        """Validated Arrow rows of the blocks table (one stamp for all rows, or one per row);
        ``rows`` are tuples, or a table with the columns ``entity_type, entity_id,
        feature_key, start_ms, size_ms, rep``."""
        if written_ms is None:
            written_ms = self._clock_ms()
        if isinstance(written_ms, int | np.integer):
            stamps = pa.repeat(pa.scalar(int(written_ms), pa.int64()), len(rows))
        else:
            stamps = pa.array(np.asarray(written_ms, dtype=np.int64))
            if len(stamps) != len(rows):
                raise OfflineTableError(
                    f"{len(stamps)} written_ms stamps for {len(rows)} block rows")
        if isinstance(rows, pa.Table):
            cols = [rows.column(n) for n in ("entity_type", "entity_id", "feature_key",
                                              "start_ms", "size_ms", "rep")]
        else:
            cols = list(zip(*rows, strict=True))
        if len(cols) != 6:
            raise OfflineTableError(
                f"block rows must have 6 fields (entity_type, entity_id, feature_key, start_ms, "
                f"size_ms, rep), got {len(cols)}"
            )
        arrow_schema = BLOCKS_SCHEMA.as_arrow()
        try:
            start = _as_array(cols[3], pa.int64())
            data = pa.Table.from_arrays(
                [
                    _as_array(cols[0], pa.large_string()),
                    _as_array(cols[1], pa.large_string()),
                    _as_array(cols[2], pa.large_string()),
                    start,
                    _as_array(cols[4], pa.int64()),
                    _as_array(cols[5], pa.large_binary()),
                    stamps,
                    _days_column(start),
                ],
                schema=arrow_schema,
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise OfflineTableError(
                f"bad block rows: {exc}; a field is null or of the wrong type"
            ) from exc
        _check_no_nulls(data, "block")
        return data

    def scan_blocks(
        self,
        *,
        feature_keys: Iterable[str] | None = None,
        entity_type: str | None = None,
        start_from: int | None = None,
        start_to: int | None = None,
        size: int | None = None,
        entity_ids: Iterable[str] | None = None,
    ) -> pa.Table:
        """Return the blocks matching every given filter, one row per block key.

        Filters are pushed down to Iceberg (partition and file pruning).
        ``start_from <= start_ms < start_to`` (half-open, like every window here).
        Duplicates of a block (at-least-once appends) are collapsed to the row
        with the latest ``written_ms``. Rows are sorted by the block key.

        Returns:
            A table with columns ``entity_type, entity_id, feature_key, start_ms,
            size_ms, rep, written_ms``.
        """
        preds = self._block_predicates(feature_keys, entity_type, start_from, start_to, size,
                                       entity_ids)
        data = self._scan("blocks", preds, _BLOCK_COLUMNS)
        return dedupe_latest(data, BLOCK_KEY, "written_ms")

    def blocks_filter(self, *, feature_keys: Iterable[str] | None = None,
                      start_from: int | None = None, start_to: int | None = None
                      ) -> BooleanExpression:
        """The Iceberg row filter :meth:`scan_blocks` pushes down for these arguments, for an
        engine that scans the table itself (its rows then still need :func:`dedupe_latest`
        by :data:`BLOCK_KEY`)."""
        return _and_all(self._block_predicates(feature_keys, None, start_from, start_to))

    @staticmethod
    def _block_predicates(feature_keys: Iterable[str] | None, entity_type: str | None,
                          start_from: int | None, start_to: int | None,
                          size: int | None = None, entity_ids: Iterable[str] | None = None
                          ) -> list[BooleanExpression]:
        preds: list[BooleanExpression] = []
        if feature_keys is not None:
            preds.append(In("feature_key", set(feature_keys)))
        if entity_ids is not None:
            preds.append(In("entity_id", set(entity_ids)))
        if entity_type is not None:
            preds.append(EqualTo("entity_type", entity_type))
        if size is not None:
            preds.append(EqualTo("size_ms", int(size)))
        return preds + _range_predicates("start_ms", "start_day", start_from, start_to)

    # -- late events ------------------------------------------------------------

    def late_marks(self, writer: str | None = None) -> dict[str, int]:
        """``{"<writer>.<topic>:<partition>": offset}``: the highest offset each writer's
        late events were committed up to (one writer's only, without the prefix, if given)."""
        table = self._tables["late_events"].refresh()
        return _writer_marks(_marks_of(table, LATE_MARK_PREFIX), writer)

    def append_late_events(
        self,
        rows: Sequence[LateEventRow | tuple[str, int, int, int, str, bytes, int]],
        *,
        writer: str | None = None,
        reset: Iterable[str] = (),
    ) -> int:
        """Append late events in one Iceberg commit; return the number of rows written.

        Args:
            rows: ``(topic, partition, offset, event_ts, event_id, payload, detected_ms)``.
            writer: a flow writing late events in offset order per partition (``blocks``,
                ``labels``). Exactly once: rows at or below the offset this writer already
                committed for their partition (a replay after a crash) are skipped, and the
                commit records the new highest offsets in its snapshot summary.
            reset: ``topic:partition`` whose Kafka log was reset (a broker restarted empty):
                their offsets start again, so their old marks are ignored and replaced.
        """
        if not rows:
            return 0
        marks_for = None
        if writer is not None:
            reset = set(reset)
            done = {k: v for k, v in self.late_marks(writer).items() if k not in reset}
            rows = [r for r in rows if r[2] < 0 or r[2] > done.get(f"{r[0]}:{r[1]}", -1)]
            if not rows:
                return 0
            newest: dict[str, int] = {}
            for r in rows:
                if r[2] >= 0:
                    part = f"{r[0]}:{r[1]}"
                    newest[part] = max(newest.get(part, -1), int(r[2]))

            def marks_for(table: Table) -> dict[str, str]:
                return _merged_marks(table, LATE_MARK_PREFIX, writer, newest, reset)
        cols = list(zip(*rows, strict=True))
        if len(cols) != 7:
            raise OfflineTableError(
                f"late event rows must have 7 fields (topic, partition, offset, event_ts, "
                f"event_id, payload, detected_ms), got {len(cols)}"
            )
        try:
            ts = pa.array(cols[3], pa.int64())
            data = pa.Table.from_arrays(
                [
                    pa.array(cols[0], pa.large_string()),
                    pa.array(cols[1], pa.int32()),
                    pa.array(cols[2], pa.int64()),
                    ts,
                    pa.array(cols[4], pa.large_string()),
                    pa.array(cols[5], pa.large_binary()),
                    pa.array(cols[6], pa.int64()),
                    _days_column(ts),
                ],
                schema=LATE_EVENTS_SCHEMA.as_arrow(),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
            raise OfflineTableError(
                f"bad late event rows: {exc}; a field is null or of the wrong type"
            ) from exc
        _check_no_nulls(data, "late event")
        self._append("late_events", data, marks_for)
        return data.num_rows

    def scan_late_events(
        self,
        topic: str | None = None,
        from_ts: int | None = None,
        to_ts: int | None = None,
    ) -> pa.Table:
        """Return late events with ``from_ts <= event_ts < to_ts``, one row per Kafka record.

        An event detected twice (re-detected after a crash) is returned once: the
        row with the latest ``detected_ms`` per ``(topic, partition, offset)``.
        Rows are sorted by ``(topic, partition, offset)``.
        """
        preds: list[BooleanExpression] = []
        if topic is not None:
            preds.append(EqualTo("topic", topic))
        preds += _range_predicates("event_ts", "event_day", from_ts, to_ts)
        data = self._scan("late_events", preds, _LATE_COLUMNS)
        return dedupe_latest(data, LATE_EVENT_KEY, "detected_ms")

    # -- helpers ----------------------------------------------------------------

    def _scan(self, name: str, preds: list[BooleanExpression], columns: Sequence[str]) -> pa.Table:
        table = self.table(name)  # type: ignore[arg-type]
        return table.scan(row_filter=_and_all(preds), selected_fields=tuple(columns)).to_arrow()

    def count_rows(self, table_name: TableName) -> int:
        """Return the number of stored rows of ``table_name``, duplicates included.

        Read from the current snapshot's summary (no data files are opened).
        """
        snapshot = self.table(table_name).current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return 0
        return int(snapshot.summary.get("total-records", "0") or 0)
