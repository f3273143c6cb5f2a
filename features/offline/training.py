"""The ``training_examples`` Iceberg table: impressions joined with their labels.

One row per (impression, table version): the forward-logged impression (ids, position,
feed type, candidate source, event time, feature watermark, and the model versions,
scores and features it was ranked with, as JSON objects), one 0/1 ``label_<action>``
column per engagement action, the delay to the first engagement, the label window it was
judged over, the event-time watermark at which the label join emitted it (``matured_at``)
and the ``version`` of the table layout that wrote it.

Versions and schema evolution: the streaming label join writes :data:`BASE_VERSION`. A
backfill writes a new version whose rows carry extra columns (``feature_<name>`` doubles,
...); :meth:`TrainingTables.append_examples` adds columns the table lacks with
``update_schema().union_by_name`` (as optional columns), so older rows read them as null.

Partitioning: ``identity(event_day)``, the UTC date of ``event_ts`` (the same derived-date
workaround as ``features.offline.tables``: Iceberg's ``day`` transform wants a timestamp
column, our times are epoch-millisecond longs).

The label join appends exactly once (its sink skips, after a crash, the rows of the
commits its snapshot does not know about); other writers may not, so
:meth:`TrainingTables.scan_examples` returns one row per ``(version, impression_id)``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pyarrow as pa
from pyiceberg.exceptions import CommitFailedException, NoSuchTableError, ValidationException
from pyiceberg.expressions import BooleanExpression, EqualTo
from pyiceberg.partitioning import PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.transforms import IdentityTransform
from pyiceberg.types import DateType, IntegerType, LongType, NestedField, StringType

from features.offline.maintenance import COMMITS, TABLE_PROPERTIES, ensure_properties
from features.offline.tables import (
    OfflineTableError,
    OfflineTables,
    _and_all,
    _commit_lock,
    _days_column,
    _range_predicates,
    create_concurrently,
    dedupe_latest,
)

__all__ = [
    "BASE_VERSION",
    "LABEL_ACTIONS",
    "TRAINING_SCHEMA",
    "TRAINING_TABLE",
    "TrainingTables",
    "decode_json_columns",
    "examples_to_arrow",
    "label_column",
]

TRAINING_TABLE = "training_examples"
BASE_VERSION = "v1"
"""The version the streaming label join writes."""

LABEL_ACTIONS: tuple[str, ...] = ("click", "like", "share", "save", "hide")
"""Engagement actions, in the order of the ``engagements`` schema's ``Action`` enum."""


def label_column(action: str) -> str:
    """Return the label column of ``action`` (``click -> label_click``)."""
    return f"label_{action}"


_STR_COLS = ("impression_id", "request_id", "user_id", "item_id", "author_id", "topic")
_TAIL_STR_COLS = ("feed_type", "source")
_JSON_COLS = ("model_versions", "scores", "features")


def _base_fields() -> list[NestedField]:
    spec: list[tuple[str, Any, bool]] = [(n, StringType(), True) for n in _STR_COLS]
    spec.append(("position", IntegerType(), True))
    spec += [(n, StringType(), True) for n in _TAIL_STR_COLS]
    spec += [("event_ts", LongType(), True), ("feature_watermark", LongType(), True)]
    spec += [(n, StringType(), True) for n in _JSON_COLS]
    spec += [(label_column(a), IntegerType(), True) for a in LABEL_ACTIONS]
    spec += [
        ("first_engagement_ms", LongType(), False),
        ("label_window_ms", LongType(), True),
        ("matured_at", LongType(), True),
        ("version", StringType(), True),
        ("event_day", DateType(), True),
    ]
    return [NestedField(i + 1, n, t, required=r) for i, (n, t, r) in enumerate(spec)]


TRAINING_SCHEMA = Schema(*_base_fields())
"""The base layout (version :data:`BASE_VERSION`); later versions may add columns."""
TRAINING_SPEC = PartitionSpec(
    PartitionField(source_id=TRAINING_SCHEMA.find_field("event_day").field_id, field_id=1000,
                   transform=IdentityTransform(), name="event_day"),
)
BASE_COLUMNS: tuple[str, ...] = tuple(
    f.name for f in TRAINING_SCHEMA.fields if f.name != "event_day"
)
"""Columns of the base layout (``event_day``, the partition column, left out)."""
_FILLED = ("version", "event_day")


def _json(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(dict(value or {}), sort_keys=True, separators=(",", ":"))


def examples_to_arrow(rows: Sequence[Mapping[str, Any]]) -> pa.Table:
    """Turn label-join example dicts into an arrow table of the base columns (no ``version``).

    Map fields (``model_versions``, ``scores``, ``features``) become JSON objects with sorted
    keys; a missing ``first_engagement_ms`` is null.

    Raises:
        OfflineTableError: a row misses a field or holds a value of the wrong type.
    """
    arrow = TRAINING_SCHEMA.as_arrow()
    names = [n for n in BASE_COLUMNS if n != "version"]
    try:
        arrays = []
        for name in names:
            if name in _JSON_COLS:
                vals = [_json(r[name]) for r in rows]
            elif name == "first_engagement_ms":
                vals = [r.get(name) for r in rows]
            else:
                vals = [r[name] for r in rows]
            arrays.append(pa.array(vals, arrow.field(name).type))
    except KeyError as exc:
        raise OfflineTableError(f"example rows miss field {exc}; expected {names}") from exc
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError) as exc:
        raise OfflineTableError(f"bad example rows: {exc}") from exc
    return pa.Table.from_arrays(arrays, names=names)


class TrainingTables:
    """The ``training_examples`` table in the catalog and namespace of an ``OfflineTables``.

    Appends share ``OfflineTables``' process-wide commit lock per (catalog, table) and retry
    lost commit races, so several sinks (and a backfill) may write at once.
    """

    def __init__(self, offline: OfflineTables, *, commit_retries: int = 5,
                 retry_backoff_s: float = 0.05):
        """Open (creating if needed) ``training_examples`` next to ``offline``'s tables.

        Raises:
            OfflineTableError: the table exists without the base columns.
        """
        self.offline = offline
        self.catalog = offline.catalog
        self.identifier = f"{offline.namespace}.{TRAINING_TABLE}"
        self._lock = _commit_lock(offline._catalog_key, self.identifier)
        self._retries = commit_retries
        self._backoff_s = retry_backoff_s
        try:
            self._table = self._create_or_load()
        except OfflineTableError:
            raise
        except Exception as exc:
            raise OfflineTableError(
                f"could not open {self.identifier!r}: {exc}; check the catalog and warehouse"
            ) from exc

    @classmethod
    def open(cls, warehouse: Any, **kwargs: Any) -> TrainingTables:
        """Open the offline tables under ``warehouse`` (see ``OfflineTables.open``) and this one."""
        return cls(OfflineTables.open(warehouse, **kwargs))

    def _create_or_load(self) -> Table:
        try:
            table = self.catalog.load_table(self.identifier)
        except NoSuchTableError:
            table = create_concurrently(lambda: self.catalog.create_table_if_not_exists(
                self.identifier, schema=TRAINING_SCHEMA, partition_spec=TRAINING_SPEC,
                properties=TABLE_PROPERTIES,
            ))
        table = ensure_properties(table)
        have = [f.name for f in table.schema().fields]
        missing = [n for n in (*BASE_COLUMNS, "event_day") if n not in have]
        if missing:
            raise OfflineTableError(
                f"table {self.identifier!r} lacks the base columns {missing}; it was created by "
                "another version of Tessera: migrate it or use another namespace"
            )
        return table

    def table(self) -> Table:
        """Return the pyiceberg table, refreshed to the latest snapshot."""
        return self._table.refresh()

    def columns(self) -> list[str]:
        """Column names of the current schema (``event_day`` excluded)."""
        return [f.name for f in self.table().schema().fields if f.name != "event_day"]

    # -- writes ---------------------------------------------------------------

    def append_rows(self, rows: Sequence[Mapping[str, Any]], version: str = BASE_VERSION) -> int:
        """Append label-join example dicts (see ``examples_to_arrow``); return rows written."""
        if not rows:
            return 0
        return self.append_examples(examples_to_arrow(rows), version)

    def append_examples(self, rows: pa.Table, version: str) -> int:
        """Append ``rows`` stamped with ``version`` in one commit; return the rows written.

        ``rows`` must carry every base column but ``version`` (``first_engagement_ms`` may be
        missing: null). Columns the table lacks are first added to its schema as optional
        columns (their arrow type converted by pyiceberg), so a new version can carry more
        columns; columns the table has and ``rows`` lacks are written as null (only optional
        ones may be missing).

        Raises:
            OfflineTableError: a base column is missing or null, a type does not convert, or
                the commit lost every retry.
        """
        if not isinstance(version, str) or not version:
            raise OfflineTableError(f"version must be a non-empty string, got {version!r}")
        if rows.num_rows == 0:
            return 0
        names = set(rows.column_names)
        required_in = [n for n in BASE_COLUMNS if n not in _FILLED and n != "first_engagement_ms"]
        missing = [n for n in required_in if n not in names]
        if missing:
            raise OfflineTableError(
                f"training rows miss the base column(s) {missing}; every row needs "
                f"{required_in}"
            )
        if "version" in names or "event_day" in names:
            rows = rows.drop_columns([n for n in _FILLED if n in names])
        with self._lock:
            for attempt in range(self._retries + 1):
                try:
                    table = self._table.refresh()
                    self._evolve(table, rows)
                    data = self._conform(table, rows, version)
                    table.append(data)
                    COMMITS.after_commit(table)
                    return data.num_rows
                except (CommitFailedException, ValidationException) as exc:
                    if attempt == self._retries:
                        raise OfflineTableError(
                            f"append to {self.identifier!r} lost {attempt + 1} commit races to "
                            f"other writers: {exc}; retry later or raise commit_retries"
                        ) from exc
                    time.sleep(self._backoff_s * (2**attempt))
        raise AssertionError("unreachable")  # pragma: no cover

    def _evolve(self, table: Table, rows: pa.Table) -> None:
        have = {f.name for f in table.schema().fields}
        extra = [f for f in rows.schema if f.name not in have]
        if not extra:
            return
        new = pa.schema([f.with_nullable(True) for f in extra])
        try:
            with table.update_schema() as update:
                update.union_by_name(new)
        except CommitFailedException:
            raise
        except Exception as exc:
            raise OfflineTableError(
                f"could not add columns {[f.name for f in extra]} to {self.identifier!r}: {exc}; "
                "use types Iceberg supports (numbers, strings, bools, binary, lists, maps)"
            ) from exc

    def _conform(self, table: Table, rows: pa.Table, version: str) -> pa.Table:
        """Return ``rows`` in the table's column order and arrow types, nulls for missing."""
        schema = table.schema()
        arrow = schema.as_arrow()
        n = rows.num_rows
        arrays = []
        for field in schema.fields:
            typ = arrow.field(field.name).type
            if field.name == "version":
                arrays.append(pa.repeat(pa.scalar(version, typ), n))
            elif field.name == "event_day":
                arrays.append(_days_column(rows.column("event_ts")))
            elif field.name in rows.column_names:
                col = rows.column(field.name)
                if field.required and col.null_count:
                    raise OfflineTableError(
                        f"training column {field.name!r} holds {col.null_count} null(s); it is "
                        "required"
                    )
                try:
                    arrays.append(col.cast(typ))
                except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
                    raise OfflineTableError(
                        f"training column {field.name!r} of type {col.type} does not convert "
                        f"to the table's {typ}: {exc}"
                    ) from exc
            elif field.required:
                raise OfflineTableError(f"training rows miss the required column {field.name!r}")
            else:
                arrays.append(pa.nulls(n, typ))
        return pa.Table.from_arrays(arrays, schema=arrow)

    # -- reads ----------------------------------------------------------------

    def scan_examples(
        self,
        version: str | None = None,
        from_ts: int | None = None,
        to_ts: int | None = None,
        *,
        columns: Iterable[str] | None = None,
    ) -> pa.Table:
        """Return examples with ``from_ts <= event_ts < to_ts``, one row per (version, impression).

        Args:
            version: only rows written by this version (default: every version).
            from_ts, to_ts: half-open event-time range (partitions are pruned).
            columns: columns to return (default: every column of the current schema).

        Rows appended twice (at-least-once delivery) are returned once: the row with the
        latest ``matured_at``. Rows are sorted by ``(impression_id, version)``.
        """
        preds: list[BooleanExpression] = []
        if version is not None:
            preds.append(EqualTo("version", version))
        preds += _range_predicates("event_ts", "event_day", from_ts, to_ts)
        want = list(columns) if columns is not None else self.columns()
        read = list(dict.fromkeys([*want, "impression_id", "version", "matured_at"]))
        data = self.table().scan(row_filter=_and_all(preds), selected_fields=tuple(read)).to_arrow()
        data = dedupe_latest(data, ("impression_id", "version"), "matured_at")
        return data.select(want)

    def last_sequence_number(self) -> int:
        """The table's newest data sequence number (0 before the first commit): every later
        commit adds files with a higher one."""
        return int(self.table().metadata.last_sequence_number)

    def keys_added_after(self, sequence_number: int) -> set[tuple[str, str]]:
        """``(impression_id, version)`` of every row in a live data file added by a commit
        after ``sequence_number`` (also rows a compaction rewrote since: a superset)."""
        table = self.table()
        snapshot = table.current_snapshot()
        out: set[tuple[str, str]] = set()
        if snapshot is None:
            return out
        import pyarrow.parquet as pq

        for manifest in snapshot.manifests(table.io):
            if manifest.sequence_number is not None and \
                    manifest.sequence_number <= sequence_number:
                continue  # every entry of a manifest is at most its own sequence number
            for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                if entry.sequence_number is None or entry.sequence_number <= sequence_number:
                    continue
                with table.io.new_input(entry.data_file.file_path).open() as f:
                    part = pq.read_table(f, columns=["impression_id", "version"])
                out.update(zip(part.column("impression_id").to_pylist(),
                               part.column("version").to_pylist()))
        return out

    def count_rows(self) -> int:
        """Stored rows, duplicates included (from the snapshot summary)."""
        snapshot = self.table().current_snapshot()
        if snapshot is None or snapshot.summary is None:
            return 0
        return int(snapshot.summary.get("total-records", "0") or 0)


def decode_json_columns(table: pa.Table) -> list[dict[str, Any]]:
    """Return the rows of a scan as dicts, JSON columns decoded to dicts."""
    rows = table.to_pylist()
    for r in rows:
        for name in _JSON_COLS:
            if name in r and isinstance(r[name], str):
                r[name] = json.loads(r[name])
    return rows
