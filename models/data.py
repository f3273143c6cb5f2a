"""Training rows in streamed batches: from the Iceberg ``training_examples`` table or memory.

A source yields ``pyarrow.RecordBatch`` es of at most ``batch_rows`` rows for a half-open
event-time range, never the whole table: :class:`IcebergExamples` scans with a row filter
(``version`` and ``event_ts`` range, partitions pruned by day) through pyiceberg's
``to_arrow_batch_reader``; :class:`ArrowExamples` slices an in-memory table (tests, small
jobs). :func:`decode_batch` turns a record batch into a columnar :data:`models.features.Batch`
where each requested feature is read from, in order, a ``feature_<name>`` column (a
backfill), a ``<name>`` column, or the ``features`` JSON logged online.

Rows are deduplicated by ``impression_id`` as they stream (at-least-once delivery can store
a row twice); only the ids are kept in memory. Unlike ``TrainingTables.scan_examples`` the
first copy read wins, not the latest-matured one: copies carry the same labels unless a
label window was re-judged.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.expressions import EqualTo

from features.errors import TesseraError
from features.offline.tables import _and_all, _range_predicates
from features.offline.training import BASE_VERSION, TrainingTables

__all__ = [
    "ArrowExamples",
    "ExampleSource",
    "IcebergExamples",
    "RayExamples",
    "TimeRange",
    "TrainingDataError",
    "decode_batch",
    "latest_version",
    "time_split",
]

DEFAULT_BATCH_ROWS = 4096


class TrainingDataError(TesseraError, ValueError):
    """Training rows cannot be read or split as asked."""


@dataclass(frozen=True)
class TimeRange:
    """A half-open event-time range ``[start, end)`` in epoch milliseconds."""

    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise TrainingDataError(
                f"time range end must be after start, got start={self.start} end={self.end}"
            )

    def as_dict(self) -> dict[str, int]:
        """Return ``{"from": start, "to": end}`` (manifest form)."""
        return {"from": self.start, "to": self.end}


def time_split(from_ts: int, to_ts: int, eval_from: int | None = None,
               eval_fraction: float = 0.2) -> tuple[TimeRange, TimeRange]:
    """Split ``[from_ts, to_ts)`` into a training range and a later evaluation range.

    Args:
        eval_from: start of the evaluation slice; default: the last ``eval_fraction`` of
            the range by time.

    Raises:
        TrainingDataError: ``eval_from`` is not strictly inside the range, or the fraction
            is not in (0, 1).
    """
    if eval_from is None:
        if not 0 < eval_fraction < 1:
            raise TrainingDataError(f"eval_fraction must be in (0, 1), got {eval_fraction!r}")
        eval_from = int(to_ts - (to_ts - from_ts) * eval_fraction)
    if not from_ts < eval_from < to_ts:
        raise TrainingDataError(
            f"eval_from={eval_from} must lie strictly inside [{from_ts}, {to_ts}); "
            "pick a time between --from and --to"
        )
    return TimeRange(from_ts, eval_from), TimeRange(eval_from, to_ts)


class ExampleSource(Protocol):
    """Anything that streams training rows of a time range."""

    def batches(self, time_range: TimeRange,
                columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield record batches of rows with ``start <= event_ts < end``."""
        ...

    def count(self, time_range: TimeRange) -> int | None:
        """Return the number of rows in the range if cheap to know (progress bars), else None."""
        ...

    def column_names(self) -> list[str]:
        """Return the columns rows may carry."""
        ...


def _rechunk(batches: Iterable[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Re-cut a stream of record batches into batches of exactly ``rows`` (the last smaller)."""
    pending: list[pa.RecordBatch] = []
    have = 0
    for b in batches:
        if b.num_rows == 0:
            continue
        pending.append(b)
        have += b.num_rows
        while have >= rows:
            table = pa.Table.from_batches(pending)
            head = table.slice(0, rows).combine_chunks()
            tail = table.slice(rows)
            yield head.to_batches()[0]
            pending = tail.combine_chunks().to_batches() if tail.num_rows else []
            have = tail.num_rows
    if have:
        yield pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def _dedupe(batches: Iterable[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    seen: set[str] = set()
    for b in batches:
        if "impression_id" not in b.schema.names:
            yield b
            continue
        ids = b.column("impression_id").to_pylist()
        keep = []
        for k in ids:
            keep.append(k not in seen)
            seen.add(k)
        yield b if all(keep) else b.filter(pa.array(keep))


class IcebergExamples:
    """Stream rows of one version of the ``training_examples`` Iceberg table.

    Args:
        training: the opened training table.
        version: table version to read (see :func:`latest_version`).
        batch_rows: rows per yielded batch.
    """

    def __init__(self, training: TrainingTables, version: str, *,
                 batch_rows: int = DEFAULT_BATCH_ROWS):
        self.training = training
        self.version = version
        self.batch_rows = batch_rows

    def column_names(self) -> list[str]:
        """Columns of the table's current schema."""
        return self.training.columns()

    def _scan(self, time_range: TimeRange, columns: Sequence[str] | None) -> Any:
        preds = [EqualTo("version", self.version)]
        preds += _range_predicates("event_ts", "event_day", time_range.start, time_range.end)
        have = self.column_names()
        fields = tuple(c for c in (columns or have) if c in have)
        return self.training.table().scan(row_filter=_and_all(preds), selected_fields=fields)

    def count(self, time_range: TimeRange) -> int | None:
        """Rows in the range (duplicates included), from the scan's file statistics."""
        try:
            return int(self._scan(time_range, ["impression_id"]).count())
        except Exception:
            return None

    def batches(self, time_range: TimeRange,
                columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield deduplicated batches of ``batch_rows`` rows, never the whole range at once."""
        cols = None if columns is None else list(dict.fromkeys([*columns, "impression_id"]))
        try:
            reader = self._scan(time_range, cols).to_arrow_batch_reader()
        except Exception as exc:
            raise TrainingDataError(
                f"could not scan {self.training.identifier!r} version {self.version!r}: {exc}"
            ) from exc
        yield from _rechunk(_dedupe(reader), self.batch_rows)


class RayExamples(IcebergExamples):
    """The rows :class:`IcebergExamples` streams, read by a Ray cluster's tasks instead of
    this process (Ray Data ``read_iceberg``: the range's files read in parallel, the same
    row filter and columns) and streamed here in the plan's order; deduplicated and cut into
    batches the same way. Needs a Ray runtime (``features.ray_engine.ray_runtime``)."""

    def batches(self, time_range: TimeRange,
                columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield deduplicated batches of ``batch_rows`` rows, never the whole range at once."""
        from features.ray_engine import iceberg_batches

        have = self.column_names()
        wanted = have if columns is None else list(dict.fromkeys([*columns, "impression_id"]))
        fields = [c for c in wanted if c in have]
        preds = [EqualTo("version", self.version)]
        preds += _range_predicates("event_ts", "event_day", time_range.start, time_range.end)
        try:
            reader = iceberg_batches(self.training.offline, self.training.identifier,
                                     _and_all(preds), fields)
            yield from _rechunk(_dedupe(reader), self.batch_rows)
        except TesseraError:
            raise
        except Exception as exc:
            raise TrainingDataError(
                f"could not scan {self.training.identifier!r} version {self.version!r} on "
                f"Ray: {exc}") from exc


class ArrowExamples:
    """Rows held in memory as a ``pyarrow.Table``, served like :class:`IcebergExamples`."""

    def __init__(self, table: pa.Table, *, batch_rows: int = DEFAULT_BATCH_ROWS):
        self.table = table
        self.batch_rows = batch_rows

    def column_names(self) -> list[str]:
        """Columns of the table."""
        return list(self.table.column_names)

    def _select(self, time_range: TimeRange) -> pa.Table:
        ts = self.table.column("event_ts")
        mask = pc.and_(pc.greater_equal(ts, time_range.start), pc.less(ts, time_range.end))
        return self.table.filter(mask)

    def count(self, time_range: TimeRange) -> int | None:
        """Rows in the range."""
        return self._select(time_range).num_rows

    def batches(self, time_range: TimeRange,
                columns: Sequence[str] | None = None) -> Iterator[pa.RecordBatch]:
        """Yield deduplicated batches of ``batch_rows`` rows of the range."""
        data = self._select(time_range)
        if columns is not None:
            keep = list(dict.fromkeys([*columns, "impression_id"]))
            data = data.select([c for c in keep if c in data.column_names])
        yield from _rechunk(_dedupe(data.to_batches(max_chunksize=self.batch_rows)),
                            self.batch_rows)


def decode_batch(batch: pa.RecordBatch, features: Sequence[str]) -> dict[str, Any]:
    """Return the batch as columns, with each name in ``features`` resolved.

    Every column of the batch is returned (numbers as numpy arrays, strings and lists as
    python lists). Each requested feature ``name`` comes from ``feature_<name>`` when that
    column holds a value, else a ``<name>`` column, else the row's ``features`` JSON;
    values missing everywhere are None.
    """
    out: dict[str, Any] = {}
    for name in batch.schema.names:
        col = batch.column(name)
        if pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            out[name] = col.to_numpy(zero_copy_only=False).astype(np.float64) \
                if col.null_count else col.to_numpy(zero_copy_only=False)
        else:
            out[name] = col.to_pylist()
    logged: list[dict[str, Any]] | None = None
    for name in features:
        backfilled = out.get(f"feature_{name}")
        direct = out.get(name)
        if backfilled is not None and not _all_missing(backfilled):
            if direct is None:
                out[name] = backfilled
            continue
        if direct is not None:
            continue
        if logged is None:
            raw = out.get("features") or [None] * batch.num_rows
            logged = [json.loads(r) if isinstance(r, str) else (r or {}) for r in raw]
        out[name] = [r.get(name) for r in logged]
    return out


def _all_missing(values: Any) -> bool:
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        return bool(np.isnan(values).all())
    return all(v is None for v in values)


def latest_version(training: TrainingTables) -> str:
    """Return the newest ``backfill-<epoch ms>`` version of the table, else ``v1``.

    Reads only the ``version`` column, in batches.
    """
    versions: set[str] = set()
    scan = training.table().scan(selected_fields=("version",))
    for b in scan.to_arrow_batch_reader():
        versions.update(v for v in pc.unique(b.column("version")).to_pylist() if v)
    backfills = []
    for v in versions:
        if v.startswith("backfill-"):
            suffix = v.removeprefix("backfill-")
            backfills.append((int(suffix) if suffix.isdigit() else -1, v))
    if backfills:
        return max(backfills)[1]
    return BASE_VERSION if BASE_VERSION in versions or not versions else sorted(versions)[-1]
