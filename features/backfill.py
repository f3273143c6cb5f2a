"""Point-in-time backfill: add feature columns to the training examples, leak-free.

For every logged impression in ``[from, to)``, each requested feature is computed over the
window the online read would have used, ``[align_down(end - W, hop), end)`` with
``end = align_down(min(feature_watermark, event_ts), b)`` (the impression's logged
watermark), from the offline blocks. Nothing at or after ``end`` is read. The result is
written as a new version of the training table with one ``feature_<name>`` column per
feature (derived features computed from their backfilled inputs).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from features.expressions import parse_derived
from features.pointintime import earliest_start, point_in_time, query_ends
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


def backfill_columns(
    examples: pa.Table,
    features: FeatureSet,
    names: Sequence[str],
    scan_blocks: Callable[..., pa.Table],
) -> dict[str, np.ndarray]:
    """Compute ``{window or derived name: values}`` for every row of ``examples``.

    Args:
        examples: rows with ``event_ts``, ``feature_watermark`` and the entity key columns.
        scan_blocks: ``OfflineTables.scan_blocks`` (or any function with its keywords).
    """
    windows, derived = resolve_names(features, names)
    ts = examples.column("event_ts").to_numpy()
    wm = examples.column("feature_watermark").to_numpy()
    out: dict[str, np.ndarray] = {}
    for spec, ws in windows.values():
        ends = query_ends(ts, wm, spec.streaming_block)
        ids = np.asarray(examples.column(spec.entity).to_pylist(), dtype=object)
        blocks = scan_blocks(feature_keys=[spec.key], start_from=earliest_start(spec, ends),
                             start_to=int(ends.max()) if len(ends) else 0)
        for wv in point_in_time(spec, ws, ids, ends, blocks):
            if wv.lists is not None:  # last_n lists travel as JSON text (models read them)
                out[wv.name] = np.array([json.dumps(v) for v in wv.lists], dtype=object)
            else:
                out[wv.name] = wv.values
    for d in derived:
        expr = parse_derived(d.expression)
        out[d.name] = np.asarray(expr.evaluate_columns({i: out[i] for i in d.inputs},
                                                       len(examples), default=d.default))
    return out


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
) -> BackfillReport:
    """Write a new version of the training table with backfilled feature columns.

    Args:
        training: ``features.offline.training.TrainingTables``.
        tables: ``features.offline.tables.OfflineTables`` (offline blocks).
        base_version: the version whose rows are extended.
        version: the new version's name (default ``backfill-<epoch ms>``).
    """
    t0 = time.perf_counter()
    examples = training.scan_examples(version=base_version, from_ts=from_ts, to_ts=to_ts)
    version = version or f"backfill-{int(time.time() * 1000)}"
    cols = backfill_columns(examples, features, names, tables.scan_blocks)
    data = examples.drop_columns([c for c in ("version",) if c in examples.column_names])
    for name, values in cols.items():
        col = f"feature_{name}"
        if col in data.column_names:
            data = data.drop_columns([col])
        typ = pa.string() if values.dtype == object else pa.float64()
        data = data.append_column(col, pa.array(values, typ))
    written = training.append_examples(data, version) if data.num_rows else 0
    return BackfillReport(version, written, tuple(cols), time.perf_counter() - t0)
