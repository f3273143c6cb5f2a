"""Point-in-time backfill: add feature columns to the training examples, leak-free.

For every logged impression in ``[from, to)``, each requested feature is computed over the
window the online read would have used, ``[align_down(end - W, hop), end)`` with
``end = align_down(min(feature_watermark, event_ts), b)`` (the impression's logged
watermark), from the offline blocks. Nothing at or after ``end`` is read. The result is
written as a new version of the training table with one ``feature_<name>`` column per
feature (derived features computed from their backfilled inputs).

``spine_columns`` does the same for any rows a user brings (a *spine*: entity columns and a
timestamp, Feast's entity dataframe): a row's window end is ``align_down(ts, 5m)`` (the
streaming block), or ``align_down(min(watermark, ts), 5m)`` when a watermark column is named,
exactly the impression rule with the row's time standing in for the impression's; values are
null where the window had no data (a ``last_n`` list: empty).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from features.expressions import parse_derived
from features.pointintime import WindowValues, earliest_start, point_in_time, query_ends
from features.spec import FeatureSet, FeatureSpec


@dataclass(frozen=True)
class BackfillReport:
    """What one backfill wrote."""

    version: str
    rows: int
    features: tuple[str, ...]
    seconds: float

    @property
    def rows_per_s(self) -> float:
        """Impressions backfilled per second."""
        return self.rows / self.seconds if self.seconds else 0.0


def resolve_names(features: FeatureSet, names: Sequence[str]) -> tuple[dict, list]:
    """Split names into window features ``{spec.key: (spec, [windows])}`` and derived specs.

    A plain feature name (``item_views``) means all its windows.
    """
    windows: dict[str, tuple[FeatureSpec, list[int]]] = {}
    derived = []
    by_window = {f.window_name(w): (f, w) for f in features.features for w in f.windows}
    by_name = {f.name: f for f in features.features}
    by_derived = {d.name: d for d in features.derived}
    unknown = []

    def need(spec: FeatureSpec, w: int) -> None:
        entry = windows.setdefault(spec.key, (spec, []))
        if w not in entry[1]:
            entry[1].append(w)

    for n in names:
        if n in by_window:
            need(*by_window[n])
        elif n in by_name:
            for w in by_name[n].windows:
                need(by_name[n], w)
        elif n in by_derived:
            derived.append(by_derived[n])
            for inp in by_derived[n].inputs:
                need(*by_window[inp])
        else:
            unknown.append(n)
    if unknown:
        raise KeyError(f"unknown features {unknown}; known: feature names, window values such "
                       f"as item_views_1h, and derived features {sorted(by_derived)}")
    return windows, derived


def _window_values(examples: pa.Table, features: FeatureSet, names: Sequence[str],
                   scan_blocks: Callable[..., pa.Table], ts: np.ndarray, wm: np.ndarray,
                   warn: Callable[[str], None] | None = None,
                   progress: Callable[[str], None] | None = None,
                   engine: BackfillEngine | None = None) -> tuple[list, list]:
    """Every requested window value of every row (``WindowValues``), and the derived specs;
    ``warn`` hears of a feature with no block at all in the range the rows need (local
    engine). ``engine`` computes the values elsewhere (``features.ray_engine``)."""
    windows, derived = resolve_names(features, names)
    for spec, _ in windows.values():
        if spec.entity not in examples.column_names:
            raise KeyError(f"the rows have no column {spec.entity!r}, the entity of "
                           f"{spec.name!r}; columns: {', '.join(examples.column_names)}")
    if engine is not None:
        t0 = time.perf_counter()
        values = engine.window_values(examples, list(windows.values()), ts, wm)
        if progress is not None:
            progress(f"{len(windows)} features for {examples.num_rows:,} rows on "
                     f"{type(engine).__name__}, {time.perf_counter() - t0:.1f}s")
        return values, derived
    values = []
    t0 = time.perf_counter()
    for done, (spec, ws) in enumerate(windows.values(), start=1):
        ends = query_ends(ts, wm, spec.streaming_block)
        ids = np.asarray(examples.column(spec.entity).cast(pa.string()).to_pylist(),
                         dtype=object)
        blocks = scan_blocks(feature_keys=[spec.key], start_from=earliest_start(spec, ends),
                             start_to=int(ends.max()) if len(ends) else 0)
        if warn is not None and not blocks.num_rows and len(ends):
            warn(f"no blocks of {spec.name} in the offline tables for this range: its values "
                 "are empty; write them with `tessera worker blocks --warehouse` or "
                 "`tessera batch blocks` (from the raw tables)")
        values.extend(point_in_time(spec, ws, ids, ends, blocks))
        if progress is not None:
            progress(f"{done}/{len(windows)} features ({spec.name}: {blocks.num_rows:,} blocks "
                     f"for {len(ids):,} rows), {time.perf_counter() - t0:.1f}s")
    return values, derived


class BackfillEngine(Protocol):
    """Computes window values of many rows somewhere else than in this process."""

    def window_values(self, rows: pa.Table, jobs: Sequence[tuple[FeatureSpec, list[int]]],
                      ts: np.ndarray, wm: np.ndarray) -> list[WindowValues]:
        """``WindowValues`` of each ``(spec, windows)`` for every row, in ``jobs`` order."""
        ...


def backfill_columns(
    examples: pa.Table,
    features: FeatureSet,
    names: Sequence[str],
    scan_blocks: Callable[..., pa.Table],
    engine: BackfillEngine | None = None,
) -> dict[str, np.ndarray]:
    """Compute ``{window or derived name: values}`` for every row of ``examples``.

    Args:
        examples: rows with ``event_ts``, ``feature_watermark`` and the entity key columns.
        scan_blocks: ``OfflineTables.scan_blocks`` (or any function with its keywords).
        engine: compute the window values there instead (the same values).
    """
    ts = examples.column("event_ts").to_numpy()
    wm = examples.column("feature_watermark").to_numpy()
    values, derived = _window_values(examples, features, names, scan_blocks, ts, wm,
                                     engine=engine)
    out: dict[str, np.ndarray] = {}
    for wv in values:
        if wv.lists is not None:  # last_n lists travel as JSON text (models read them)
            out[wv.name] = np.array([json.dumps(v) for v in wv.lists], dtype=object)
        else:
            out[wv.name] = wv.values
    for d in derived:
        expr = parse_derived(d.expression)
        out[d.name] = np.asarray(expr.evaluate_columns({i: out[i] for i in d.inputs},
                                                       len(examples), default=d.default))
    return out


def spine_columns(
    spine: pa.Table,
    features: FeatureSet,
    names: Sequence[str],
    scan_blocks: Callable[..., pa.Table],
    *,
    timestamp: str = "event_ts",
    watermark: str | None = None,
    warn: Callable[[str], None] | None = None,
    progress: Callable[[str], None] | None = None,
    engine: BackfillEngine | None = None,
) -> pa.Table:
    """Return ``spine`` with one column per requested window value and derived feature.

    Args:
        spine: rows with the entity columns of the features and ``timestamp``.
        timestamp: the column of each row's time: epoch ms integers, an Arrow timestamp, or
            ISO-8601 text.
        watermark: optional column (same forms) of the watermark each row's read saw.
        scan_blocks: ``OfflineTables.scan_blocks`` (or any function with its keywords).
        warn: called with a message for each feature that has no block at all in range.
        progress: called with a line after each feature.
        engine: compute the window values there instead (the same values).

    A window with no data gives null (``last_n``: an empty list), never a default; derived
    features are computed from their inputs with the inputs' defaults.

    Raises:
        SpineError: a named column is missing, or a time does not parse (row and value named).
    """
    ts = spine_times(spine, timestamp)
    wm = spine_times(spine, watermark) if watermark is not None else ts
    try:
        values, derived = _window_values(spine, features, names, scan_blocks, ts, wm, warn,
                                         progress, engine)
    except KeyError as exc:
        raise SpineError(exc.args[0]) from None
    out = spine
    filled: dict[str, np.ndarray] = {}
    for wv in values:
        if wv.lists is not None:
            col = pa.array(wv.lists, pa.list_(pa.string()))
        else:
            col = pa.array(wv.values, pa.float64(), mask=wv.missing)
            filled[wv.name] = wv.values
        out = _put_column(out, wv.name, col)
    for d in derived:
        expr = parse_derived(d.expression)
        vals = np.asarray(expr.evaluate_columns({i: filled[i] for i in d.inputs}, len(spine),
                                                default=d.default), dtype=np.float64)
        out = _put_column(out, d.name, pa.array(vals, pa.float64()))
    return out


class SpineError(ValueError):
    """A spine cannot be read: a missing column or a time that does not parse."""


def _put_column(table: pa.Table, name: str, col: pa.Array) -> pa.Table:
    if name in table.column_names:
        table = table.drop_columns([name])
    return table.append_column(name, col)


def spine_times(spine: pa.Table, column: str) -> np.ndarray:
    """Epoch ms of every row of ``spine[column]`` (integers as ms, timestamps, ISO-8601 text).

    Raises:
        SpineError: no such column, or a null or unparseable value (the first one named).
    """
    import pyarrow.compute as pc

    if column not in spine.column_names:
        raise SpineError(f"the spine has no column {column!r} (the row times); its columns: "
                         f"{', '.join(spine.column_names)}; name the time column")
    col = spine.column(column).combine_chunks()
    if pa.types.is_timestamp(col.type):
        ms = col.cast(pa.timestamp("ms", tz=col.type.tz), safe=False).cast(pa.int64())
    elif pa.types.is_integer(col.type):
        ms = col.cast(pa.int64())
    elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        ms = _text_times(pc.utf8_trim_whitespace(col), column)
    else:
        raise SpineError(f"column {column!r} has type {col.type}; a time column holds epoch ms "
                         "integers, timestamps or ISO-8601 text")
    nulls = ms.is_null()
    if pc.any(nulls).as_py():
        bad = int(np.flatnonzero(nulls.to_numpy(zero_copy_only=False))[0])
        raise SpineError(f"column {column!r}, row {bad}: the time is missing")
    return ms.to_numpy(zero_copy_only=False).astype(np.int64)


def _text_times(text: pa.Array, column: str) -> pa.Array:
    """Epoch ms of time text: digits are epoch ms, anything else ISO-8601 (UTC unless zoned)."""
    import pyarrow.compute as pc

    digits = pc.fill_null(pc.match_substring_regex(text, r"^[+-]?[0-9]{1,18}$"), False)
    out = np.zeros(len(text), np.int64)
    valid = ~text.is_null().to_numpy(zero_copy_only=False)
    is_digits = digits.to_numpy(zero_copy_only=False).astype(bool)
    if is_digits.any():
        out[is_digits] = pc.filter(text, digits).cast(pa.int64()).to_numpy()
    iso_rows = np.flatnonzero(~is_digits & valid)
    if len(iso_rows):
        iso = text.take(pa.array(iso_rows))
        zoned = pc.match_substring_regex(iso, r"(Z|[+-][0-9]{2}:?[0-9]{2})$")
        iso = pc.if_else(zoned, iso, pc.binary_join_element_wise(iso, "Z", ""))
        try:
            out[iso_rows] = pc.cast(iso, pa.timestamp("ms", tz="UTC")).cast(
                pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            from datetime import datetime

            for i in iso_rows.tolist():
                try:
                    datetime.fromisoformat(text[i].as_py().replace("Z", "+00:00"))
                except ValueError:
                    raise SpineError(
                        f"column {column!r}, row {i}: {text[i].as_py()!r} is not a time "
                        "(epoch ms or ISO-8601 such as 2026-11-29T16:05:00Z)") from None
            raise SpineError(f"column {column!r}: times do not parse as ISO-8601") from None
    return pa.array(out, pa.int64(), mask=~valid)


def run_backfill(
    training,
    tables,
    features: FeatureSet,
    names: Sequence[str],
    from_ts: int,
    to_ts: int,
    *,
    base_version: str = "v1",
    version: str | None = None,
    engine: BackfillEngine | None = None,
) -> BackfillReport:
    """Write a new version of the training table with backfilled feature columns.

    Args:
        training: ``features.offline.training.TrainingTables``.
        tables: ``features.offline.tables.OfflineTables`` (offline blocks).
        base_version: the version whose rows are extended.
        version: the new version's name (default ``backfill-<epoch ms>``).
        engine: where the window values are computed (default: this process;
            ``features.ray_engine.RayBackfillEngine``: a Ray cluster). The same values.
    """
    t0 = time.perf_counter()
    examples = training.scan_examples(version=base_version, from_ts=from_ts, to_ts=to_ts)
    version = version or f"backfill-{int(time.time() * 1000)}"
    cols = backfill_columns(examples, features, names, tables.scan_blocks, engine)
    data = examples.drop_columns([c for c in ("version",) if c in examples.column_names])
    for name, values in cols.items():
        col = f"feature_{name}"
        if col in data.column_names:
            data = data.drop_columns([col])
        typ = pa.string() if values.dtype == object else pa.float64()
        data = data.append_column(col, pa.array(values, typ))
    written = training.append_examples(data, version) if data.num_rows else 0
    return BackfillReport(version, written, tuple(cols), time.perf_counter() - t0)
