"""Online/offline consistency: do the logged online feature values equal the offline ones?

For a sample of logged impressions, every logged feature value that is a window or derived
feature of the definitions is recomputed from the offline blocks with the point-in-time
backfill (``features.backfill.backfill_columns``: the same window ``[align_down(end - W, h),
end)`` with ``end = align_down(min(feature_watermark, event_ts), b)`` the online read used)
and compared with what serving logged. Serving logs float32, so values match when
``|offline - logged| <= 1e-6 * max(1, |offline|)`` (or both are NaN).

Each mismatch is attributed to one cause, checked in this order:

``late_data``
    A late event (from the ``late_events`` table) of the row's entity, of the feature's
    source topic and passing its filter, falls in the row's window: the online read may
    not have seen it, the batch-corrected offline blocks do. A batch run before the request
    may already have corrected some of them into the online blocks (``tessera batch blocks``
    writes online too), so for counts and sums the logged value must be the offline value
    less the contribution of some of those late events: for a count, an integer between the
    offline value less their number and the offline value; for a sum, between the offline
    value less their positive values and less their negative ones. Else the row is
    ``other``.
    For the other aggregations and for derived features (a late event in the window of any
    input) the late event is taken as the cause.
``missing_blocks``
    The offline blocks table has no block of the entity and feature inside the window while
    the logged value is not the no-data value, or it has blocks while the logged value is the
    no-data value (the online read had none). The no-data value is what a read without any
    block returns (``0`` for counts and sums, the feature's ``default`` otherwise; for a
    derived feature, the expression over its inputs' no-data values).
``other``
    Anything else (a bug, a changed definition, a corrupt block, a window-end mismatch).

``missing_blocks`` and ``other`` are **unexplained**: a served value that is not what the
backfill recomputes from what the online read could see. A healthy platform has none; the
report's ``unexplained`` counts them, apart from the late-data differences.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, get_args

import numpy as np
import pyarrow as pa

from features.backfill import BackfillEngine, backfill_columns
from features.errors import TesseraError
from features.expressions import parse_derived, parse_filter
from features.fingerprint import fingerprint_name, list_fingerprint
from features.pointintime import earliest_start, point_in_time, query_ends
from features.spec import DerivedFeatureSpec, FeatureSet, FeatureSpec
from features.tiling import tail_hop
from features.timeutil import to_iso

__all__ = [
    "CAUSES",
    "UNEXPLAINED",
    "Cause",
    "ConsistencyError",
    "ConsistencyReport",
    "FeatureConsistency",
    "Mismatch",
    "consistency_report",
    "logged_features",
    "values_match",
]

Cause = Literal["late_data", "missing_blocks", "other"]
CAUSES: tuple[Cause, ...] = get_args(Cause)
UNEXPLAINED: tuple[Cause, ...] = ("missing_blocks", "other")
"""Causes that are not late data: the served value is not what the backfill recomputes."""

REL_TOLERANCE = 1e-6
"""Serving logs float32: ``|a - b| <= REL_TOLERANCE * max(1, |a|)`` counts as equal."""
EXAMPLES_PER_CAUSE = 3
_REQUIRED = ("event_ts", "feature_watermark")


class ConsistencyError(TesseraError):
    """The impressions or late events cannot be checked as given."""


def values_match(offline: np.ndarray, logged: np.ndarray) -> np.ndarray:
    """Return where ``logged`` equals ``offline`` up to float32 logging (NaN equals NaN)."""
    a = np.asarray(offline, dtype=np.float64)
    b = np.asarray(logged, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(a - b) <= REL_TOLERANCE * np.maximum(1.0, np.abs(a))
    return close | (np.isnan(a) & np.isnan(b))


@dataclass(frozen=True)
class Mismatch:
    """One impression whose logged value differs from the offline one."""

    impression_id: str
    cause: Cause
    logged: float
    offline: float


@dataclass(frozen=True)
class FeatureConsistency:
    """How one feature's logged values compare with the offline recomputation."""

    name: str
    rows: int
    matched: int
    causes: Mapping[Cause, int]
    examples: tuple[Mismatch, ...] = ()

    @property
    def matched_share(self) -> float:
        """Share of rows whose logged value equals the offline value (1.0 with no rows)."""
        return self.matched / self.rows if self.rows else 1.0

    @property
    def unexplained(self) -> int:
        """Mismatched rows that late data does not account for (``UNEXPLAINED`` causes)."""
        return sum(int(self.causes.get(c, 0)) for c in UNEXPLAINED)

    def share(self, cause: Cause) -> float:
        """Share of rows mismatched for ``cause``."""
        return self.causes.get(cause, 0) / self.rows if self.rows else 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "name": self.name,
            "rows": self.rows,
            "matched": self.matched,
            "matched_share": self.matched_share,
            "unexplained": self.unexplained,
            "causes": {c: int(self.causes.get(c, 0)) for c in CAUSES},
            "examples": [
                {"impression_id": m.impression_id, "cause": m.cause,
                 "logged": _json_float(m.logged), "offline": _json_float(m.offline)}
                for m in self.examples
            ],
        }


@dataclass(frozen=True)
class ConsistencyReport:
    """Per-feature consistency of a sample of logged impressions."""

    from_ts: int | None
    to_ts: int | None
    impressions: int
    sampled: int
    seed: int
    late_events: int
    features: tuple[FeatureConsistency, ...] = field(default_factory=tuple)

    @property
    def rows(self) -> int:
        """Compared values, all features together."""
        return sum(f.rows for f in self.features)

    @property
    def matched_share(self) -> float:
        """Share of compared values that match, all features together."""
        rows = self.rows
        return sum(f.matched for f in self.features) / rows if rows else 1.0

    @property
    def unexplained(self) -> int:
        """Mismatched values, all features together, that late data does not account for."""
        return sum(f.unexplained for f in self.features)

    def feature(self, name: str) -> FeatureConsistency:
        """Return the result of feature ``name`` (KeyError naming the known ones otherwise)."""
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"no result for {name!r}; have {[f.name for f in self.features]}")

    def range_text(self) -> str:
        """``<from> .. <to>`` in ISO-8601 UTC (``?`` for an open bound)."""
        lo = to_iso(self.from_ts) if self.from_ts is not None else "?"
        hi = to_iso(self.to_ts) if self.to_ts is not None else "?"
        return f"{lo} .. {hi}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return {
            "from_ts": self.from_ts,
            "to_ts": self.to_ts,
            "impressions": self.impressions,
            "sampled": self.sampled,
            "seed": self.seed,
            "late_events": self.late_events,
            "rows": self.rows,
            "matched_share": self.matched_share,
            "unexplained": self.unexplained,
            "features": [f.to_dict() for f in self.features],
        }

    def to_json(self, *, indent: int | None = 2) -> str:
        """The report as JSON text (NaN values as ``null``)."""
        return json.dumps(self.to_dict(), indent=indent)

    def to_table(self) -> str:
        """The report as a readable fixed-width table, then a few example mismatches."""
        lines = [
            f"online/offline consistency {self.range_text()}",
            f"{self.sampled:,} of {self.impressions:,} impressions sampled (seed {self.seed}), "
            f"{self.late_events:,} late events; {self.rows:,} values, "
            f"{self.matched_share:.1%} match, {self.unexplained:,} unexplained",
            "",
        ]
        if self.sampled == 0:
            lines[1] = "no logged impressions in the range"
            return "\n".join(lines)
        if not self.features:
            lines.append("no logged feature is a window or derived feature of the definitions")
            return "\n".join(lines)
        width = max(len("feature"), *(len(f.name) for f in self.features))
        head = (f"{'feature':<{width}}  {'rows':>7}  {'matched':>8}  "
                + "  ".join(f"{c:>14}" for c in CAUSES))
        lines += [head, "-" * len(head)]
        for f in self.features:
            lines.append(f"{f.name:<{width}}  {f.rows:>7,}  {f.matched_share:>8.1%}  "
                         + "  ".join(f"{f.causes.get(c, 0):>14,}" for c in CAUSES))
        examples = [(f.name, m) for f in self.features for m in f.examples]
        if examples:
            lines += ["", "example mismatches:"]
            id_width = max(len(m.impression_id) for _, m in examples)
            for name, m in examples:
                lines.append(f"  {name:<{width}}  {m.cause:<14}  {m.impression_id:<{id_width}}  "
                             f"logged {m.logged:.6g}  offline {m.offline:.6g}")
        return "\n".join(lines)


def _json_float(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


# -- inputs ---------------------------------------------------------------------------------


def logged_features(column: pa.ChunkedArray | pa.Array | Sequence[Any]) -> list[dict[str, float]]:
    """Decode a logged-features column into one ``{name: value}`` dict per row.

    Accepts JSON object strings (the training table), arrow maps (the raw impressions table,
    read as lists of ``(key, value)`` pairs), structs or plain dicts. ``None`` entries and
    null values are "not logged".

    Raises:
        ConsistencyError: an entry is neither of these.
    """
    values = column.to_pylist() if hasattr(column, "to_pylist") else list(column)
    out: list[dict[str, float]] = []
    for i, v in enumerate(values):
        if v is None:
            out.append({})
            continue
        if isinstance(v, str | bytes):
            try:
                v = json.loads(v)
            except ValueError as exc:
                raise ConsistencyError(
                    f"logged features of row {i} are not a JSON object: {exc}; the column "
                    "must hold {name: value} objects"
                ) from exc
        if isinstance(v, list):
            v = dict(v)
        if not isinstance(v, Mapping):
            raise ConsistencyError(
                f"logged features of row {i} are a {type(v).__name__}, expected a "
                "{name: value} object (JSON text, a map or a dict)"
            )
        out.append({str(k): float(x) for k, x in v.items() if x is not None})
    return out


def _canonical(row: dict[str, float], entity_type_of: Mapping[str, str]) -> dict[str, float]:
    """Map entity-prefixed logged names (``user:user_clicks_1d``, as serving logs the user's
    features) to the feature name when the prefix is that feature's entity type."""
    out = dict(row)
    for key, value in row.items():
        prefix, sep, name = key.partition(":")
        if sep and entity_type_of.get(name) == prefix and name not in row:
            out[name] = value
    return out


def _late_records(late_events: pa.Table | None) -> dict[str, list[Mapping[str, Any]]]:
    """Decode the late events into records per topic.

    Rows of the ``late_events`` table carry the event as framed Avro bytes (``payload``);
    a table without ``payload`` is taken to hold the event fields as columns already.
    """
    if late_events is None or late_events.num_rows == 0:
        return {}
    if "topic" not in late_events.column_names:
        raise ConsistencyError(
            f"late events need a 'topic' column; got {late_events.column_names}; pass "
            "OfflineTables.scan_late_events(...)"
        )
    out: dict[str, list[Mapping[str, Any]]] = {}
    if "payload" not in late_events.column_names:
        for rec in late_events.to_pylist():
            out.setdefault(rec["topic"], []).append(rec)
        return out
    from schemas.codec import decode

    topics = late_events.column("topic").to_pylist()
    payloads = late_events.column("payload").to_pylist()
    for i, (topic, payload) in enumerate(zip(topics, payloads, strict=True)):
        try:
            _, rec = decode(payload, topic=topic)
        except Exception as exc:
            raise ConsistencyError(
                f"late event {i} of topic {topic!r} does not decode: {exc}; the payload must "
                "be a framed single-event record (what the blocks flow's late sink writes)"
            ) from exc
        out.setdefault(topic, []).append(rec)
    return out


class _LateEvents(NamedTuple):
    """The late events of one entity that count for a feature: times (sorted), values."""

    ts: np.ndarray
    values: np.ndarray  # float64, NaN where the event has no numeric value


def _late_index(spec: FeatureSpec, records: Sequence[Mapping[str, Any]]
                ) -> dict[str, _LateEvents]:
    """``{entity id: its late events}`` that count for ``spec`` (entity, filter, a value)."""
    flt = parse_filter(spec.filter) if spec.filter else None
    by_entity: dict[str, list[tuple[int, float]]] = {}
    for rec in records:
        ent = rec.get(spec.entity)
        if ent is None or rec.get("event_ts") is None:
            continue
        if spec.value and rec.get(spec.value) is None:
            continue  # the streaming flow skips an event without a value
        if flt is not None:
            try:
                if not flt.evaluate_row(rec):
                    continue
            except KeyError:
                continue
        raw = rec.get(spec.value) if spec.value else None
        value = float(raw) if isinstance(raw, int | float) else float("nan")
        by_entity.setdefault(str(ent), []).append((int(rec["event_ts"]), value))
    out = {}
    for e, pairs in by_entity.items():
        arr = np.asarray(pairs, dtype=np.float64).reshape(-1, 2)
        order = np.argsort(arr[:, 0], kind="stable")
        out[e] = _LateEvents(arr[order, 0].astype(np.int64), arr[order, 1])
    return out


def _block_index(blocks: pa.Table) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{entity id: (block starts, block ends)}`` sorted by start."""
    if blocks is None or blocks.num_rows == 0:
        return {}
    ids = blocks.column("entity_id").to_pylist()
    starts = blocks.column("start_ms").to_numpy()
    ends = starts + blocks.column("size_ms").to_numpy()
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(ids):
        groups.setdefault(e, []).append(i)
    out = {}
    for e, rows in groups.items():
        idx = np.asarray(rows, dtype=np.int64)
        idx = idx[np.argsort(starts[idx], kind="stable")]
        out[e] = (starts[idx], ends[idx])
    return out


def _late_in(index: dict[str, _LateEvents], ids: Sequence[str], lo: np.ndarray,
             hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row: how many late events of ``index[id]`` fall in ``[lo, hi)``, and the sums of
    their positive and of their negative values."""
    count = np.zeros(len(ids), dtype=np.int64)
    positive = np.zeros(len(ids), dtype=np.float64)
    negative = np.zeros(len(ids), dtype=np.float64)
    for i, e in enumerate(ids):
        late = index.get(e)
        if late is not None and len(late.ts):
            a, b = np.searchsorted(late.ts, [lo[i], hi[i]], side="left").tolist()
            count[i] = b - a
            vals = np.nan_to_num(late.values[a:b])
            positive[i] = vals[vals > 0].sum()
            negative[i] = vals[vals < 0].sum()
    return count, positive, negative


def _within(got: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, integral: bool) -> np.ndarray:
    """Where ``lo <= got <= hi`` up to float32 logging (and ``got`` whole, for counts)."""
    tol = REL_TOLERANCE * np.maximum(1.0, np.abs(hi))
    with np.errstate(invalid="ignore"):
        ok = (got >= lo - tol) & (got <= hi + tol)
        if integral:
            ok &= np.abs(got - np.round(got)) <= tol
    return ok


def _has_blocks(index: dict[str, tuple[np.ndarray, np.ndarray]], ids: Sequence[str],
                lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per row: does the entity have a block lying inside ``[lo, hi)``?"""
    out = np.zeros(len(ids), dtype=bool)
    for i, e in enumerate(ids):
        got = index.get(e)
        if got is None:
            continue
        starts, ends = got
        a = np.searchsorted(starts, lo[i], side="left")
        b = np.searchsorted(starts, hi[i], side="left")
        out[i] = bool(np.any(ends[a:b] <= hi[i]))
    return out


_EMPTY_BLOCKS = pa.table({
    "entity_id": pa.array([], pa.string()),
    "start_ms": pa.array([], pa.int64()),
    "size_ms": pa.array([], pa.int64()),
    "rep": pa.array([], pa.binary()),
})


def _no_data_value(spec: FeatureSpec, window: int) -> float:
    """What a read of ``spec`` over ``window`` returns when the entity has no block."""
    end = np.array([spec.block_sizes[-1] * 1000], dtype=np.int64)
    return float(point_in_time(spec, [window], ["-"], end, _EMPTY_BLOCKS)[0].values[0])


# -- the report -------------------------------------------------------------------------------


@dataclass
class _Signals:
    """Per row of the sample, for one feature: late event in the window, blocks, no-data value.

    ``late_range``: for counts and sums, the ``(lowest, highest)`` value an online read
    missing some of the window's late events could have given; None for the others.
    """

    late: np.ndarray
    blocks: np.ndarray
    no_data: float
    late_range: tuple[np.ndarray, np.ndarray] | None = None


def consistency_report(
    training_or_impressions: pa.Table,
    features: FeatureSet,
    scan_blocks: Callable[..., pa.Table],
    late_events: pa.Table | None,
    *,
    sample: int = 10_000,
    seed: int = 0,
    from_ts: int | None = None,
    to_ts: int | None = None,
    features_column: str = "features",
    engine: BackfillEngine | None = None,
) -> ConsistencyReport:
    """Compare logged online feature values with the offline recomputation, per feature.

    Args:
        training_or_impressions: logged impressions: ``event_ts``, ``feature_watermark``, the
            entity key columns of the checked features, the logged features (column
            ``features_column``: JSON text, a map or dicts) and, for examples,
            ``impression_id``.
        features: the definitions; logged names that are neither a window value
            (``item_views_1h``) nor a derived feature are ignored; a name prefixed with its
            entity type (``user:user_clicks_1d``, as serving logs user features) counts as
            the feature.
        scan_blocks: ``OfflineTables.scan_blocks`` (or any function with its keywords).
        late_events: ``OfflineTables.scan_late_events(...)`` over (at least) every window of
            the range, or ``None`` when there are none.
        sample: at most this many impressions are checked, drawn uniformly with ``seed``.
        from_ts, to_ts: the range, for the report's title (default: the sample's times).
        engine: recompute the values there (``features.ray_engine.RayBackfillEngine``: a
            Ray cluster) instead of in this process; the same values, so the same report.
            This process then reads the blocks of a feature only to attribute its
            mismatches (none for a feature whose logged values all match).

    Returns:
        A :class:`ConsistencyReport` with one entry per checked feature, sorted by name.

    Raises:
        ConsistencyError: a required column is missing or ``sample`` is not positive.
    """
    if sample < 1:
        raise ConsistencyError(f"sample must be >= 1, got {sample}; pass e.g. sample=10000")
    table = training_or_impressions
    missing = [c for c in (*_REQUIRED, features_column) if c not in table.column_names]
    if missing:
        raise ConsistencyError(
            f"impressions miss the column(s) {missing}; need event_ts, feature_watermark, the "
            f"entity keys and the logged features ({features_column!r}), have "
            f"{table.column_names}"
        )
    n_in = table.num_rows
    if n_in > sample:
        rng = np.random.default_rng(seed)
        table = table.take(pa.array(np.sort(rng.choice(n_in, size=sample, replace=False))))
    n = table.num_rows
    late_records = _late_records(late_events)
    n_late = sum(len(v) for v in late_records.values())
    ts = table.column("event_ts").to_numpy()
    if from_ts is None and n:
        from_ts = int(ts.min())
    if to_ts is None and n:
        to_ts = int(ts.max()) + 1

    logged = logged_features(table.column(features_column))
    by_window = {f.window_name(w): (f, w) for f in features.features for w in f.windows}
    by_derived = {d.name: d for d in features.derived}
    # list values are logged by fingerprint (features.fingerprint): "<name>#fp"
    by_list = {fingerprint_name(k): k for k, (f, _) in by_window.items()
               if f.aggregation == "last_n"}
    entity_type_of = {**{k: f.entity_type for k, (f, _) in by_window.items()},
                      **{k: d.entity_type for k, d in by_derived.items()},
                      **{k: by_window[v][0].entity_type for k, v in by_list.items()}}
    logged = [_canonical(row, entity_type_of) for row in logged]
    as_numbers = set(by_list.values())  # a list is compared by fingerprint, never as a number
    names = sorted({k for row in logged for k in row
                    if k in entity_type_of and k not in as_numbers})
    needed_entities = {by_window[by_list.get(k, k)][0].entity for k in names
                       if by_list.get(k, k) in by_window}
    for k in names:
        if k in by_derived:
            needed_entities |= {by_window[i][0].entity for i in by_derived[k].inputs}
    absent = sorted(e for e in needed_entities if e not in table.column_names)
    if absent:
        raise ConsistencyError(
            f"impressions miss the entity key column(s) {absent} of the logged features; "
            f"have {table.column_names}"
        )
    if not names or n == 0:
        return ConsistencyReport(from_ts, to_ts, n_in, n, seed, n_late, ())

    scanned: dict[str, pa.Table] = {}

    def capture(**kwargs: Any) -> pa.Table:
        blocks = scan_blocks(**kwargs)
        for key in kwargs.get("feature_keys") or ():
            scanned[key] = blocks
        return blocks

    offline = backfill_columns(table, features,
                               list(dict.fromkeys(by_list.get(k, k) for k in names)), capture,
                               engine=engine)
    for fp_name, name in by_list.items():
        if fp_name in names:  # the backfill gives lists as JSON text
            offline[fp_name] = np.array([list_fingerprint(json.loads(v)) for v in offline[name]],
                                        dtype=np.float64)
    wm = table.column("feature_watermark").to_numpy()
    ids = (table.column("impression_id").to_pylist() if "impression_id" in table.column_names
           else [str(i) for i in range(n)])

    signals: dict[str, _Signals] = {}
    late_by_spec: dict[str, dict[str, _LateEvents]] = {}
    blocks_by_spec: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}

    def window_signals(name: str) -> _Signals:
        if name in signals:
            return signals[name]
        spec, w = by_window[by_list.get(name, name)]
        ends = query_ends(ts, wm, spec.streaming_block)
        if spec.key not in late_by_spec:
            late_by_spec[spec.key] = _late_index(spec, late_records.get(spec.source, ()))
            if spec.key not in scanned:  # recomputed elsewhere (engine): read them here now
                capture(feature_keys=[spec.key], start_from=earliest_start(spec, ends),
                        start_to=int(ends.max()) if len(ends) else 0)
            blocks_by_spec[spec.key] = _block_index(scanned.get(spec.key))
        hop = tail_hop(w, spec.block_sizes)
        lo = ends - w
        lo = lo - lo % hop
        ents = [None if e is None else str(e) for e in table.column(spec.entity).to_pylist()]
        count, positive, negative = _late_in(late_by_spec[spec.key], ents, lo, ends)
        late_range = None
        if spec.aggregation in ("count", "sum"):
            want = np.asarray(offline[name], dtype=np.float64)
            if spec.aggregation == "count":
                late_range = (want - count, want)
            else:
                late_range = (want - positive, want - negative)
        no_data = list_fingerprint([]) if name in by_list else _no_data_value(spec, w)
        sig = _Signals(count > 0, _has_blocks(blocks_by_spec[spec.key], ents, lo, ends),
                       no_data, late_range)
        signals[name] = sig
        return sig

    def derived_signals(d: DerivedFeatureSpec) -> _Signals:
        # an input is a window value or a derived feature defined above this one
        inputs = [derived_signals(by_derived[i]) if i in by_derived else window_signals(i)
                  for i in d.inputs]
        late = np.logical_or.reduce([s.late for s in inputs])
        blocks = np.logical_or.reduce([s.blocks for s in inputs])
        no_data = parse_derived(d.expression).evaluate_row(
            {i: s.no_data for i, s in zip(d.inputs, inputs, strict=True)}, default=d.default)
        return _Signals(late, blocks, float(no_data))

    results = []
    for name in names:
        present = np.array([name in row for row in logged], dtype=bool)
        got = np.array([row.get(name, np.nan) for row in logged], dtype=np.float64)
        want = np.asarray(offline[name], dtype=np.float64)
        match = values_match(want, got)
        if not (present & ~match).any():  # nothing to attribute
            results.append(FeatureConsistency(name, int(present.sum()),
                                              int(np.sum(present & match)),
                                              dict.fromkeys(CAUSES, 0), ()))
            continue
        sig = (window_signals(name) if name in by_window or name in by_list
               else derived_signals(by_derived[name]))
        logged_no_data = values_match(np.full(n, sig.no_data), got)
        late = sig.late if sig.late_range is None else \
            sig.late & _within(got, *sig.late_range, integral=name in by_window
                               and by_window[name][0].aggregation == "count")
        cause = np.where(late, 0, np.where(sig.blocks == logged_no_data, 1, 2))
        bad = present & ~match
        counts = {c: int(np.sum(bad & (cause == k))) for k, c in enumerate(CAUSES)}
        examples = []
        for k, c in enumerate(CAUSES):
            for i in np.flatnonzero(bad & (cause == k))[:EXAMPLES_PER_CAUSE].tolist():
                examples.append(Mismatch(str(ids[i]), c, float(got[i]), float(want[i])))
        results.append(FeatureConsistency(name, int(present.sum()),
                                          int(np.sum(present & match)), counts, tuple(examples)))
    return ConsistencyReport(from_ts, to_ts, n_in, n, seed, n_late, tuple(results))
