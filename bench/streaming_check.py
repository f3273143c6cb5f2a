"""Output checks of the streaming bench: Tessera's stored blocks against the peer's windows.

For a sample of entities (:func:`pick_sample`), :func:`read_blocks` reads Tessera's blocks
back from the LMDB store and :func:`compare` compares each with the peer's window of the
same (entity, start, size):

* count, sum, mean, min, max and last_n must be equal (the same events, the same order);
* ``approx_distinct``: the two HLL estimates within 5% of each other; two independent
  lg_k=12 sketches (different hash functions) differ by more than that about once in a few
  hundred blocks, so a pair that does is accepted when both are within 5% of the exact
  distinct count of the window's events;
* ``approx_quantile``: the peer's quantile within twice the KLL rank error (both sketches
  err) of the quantile rank in Tessera's sketch; failing that, both results within that
  rank error of the exact rank among the window's values.

Every stored block of a sampled entity must have a peer window; a peer window whose block
the store dropped (retention: finer blocks no window reads any more) is not compared, and
every (feature, block size) must still be compared at least once. :func:`count_total` sums
the stored 1d ``item_views`` counts of every item (the bench wants every event produced).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bench.peer_features import PeerFeature
from bench.streaming_data import AUTHORS, Views

DAY = 86_400_000
HLL_TOLERANCE = 0.05
BlockKey = tuple[str, str, int, int]  # entity type, entity id, start, size


@dataclass
class CheckReport:
    """What the comparison found: blocks compared per (feature, size), and the differences."""

    compared: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    sketch_fallbacks: Counter[str] = field(default_factory=Counter)
    not_stored: Counter[str] = field(default_factory=Counter)
    max_hll_diff: float = 0.0

    @property
    def ok(self) -> bool:
        """Whether every compared block matched."""
        return not self.problems


# -- Tessera's side -------------------------------------------------------------------------


def read_blocks(store_url: str, specs: Sequence[Any], sample: dict[str, list[str]]
                ) -> dict[BlockKey, dict[str, Any]]:
    """Tessera's reps of the sampled entities: ``{(etype, id, start, size): {feature: rep}}``."""
    from features.aggregations import build_aggregation
    from features.store import open_store

    out: dict[BlockKey, dict[str, Any]] = {}
    aggs = {spec.name: build_aggregation(spec) for spec in specs}
    with open_store(store_url, readonly=True) as store:
        for etype, ids in sample.items():
            feats = [s for s in specs if s.entity_type == etype]
            for entity, table in zip(ids, store.get_block_tables(etype, "views", ids)):
                if table is None:
                    continue
                for spec in feats:
                    agg = aggs[spec.name]
                    fb = table.feature_blocks(spec.key)
                    offs = fb.offsets.tolist()
                    for i, (start, size) in enumerate(zip(fb.starts.tolist(), fb.sizes.tolist())):
                        rep = agg.from_bytes(bytes(fb.blob[offs[i]:offs[i + 1]]))
                        out.setdefault((etype, entity, start, size), {})[spec.name] = rep
    return out


def count_total(store_url: str) -> int:
    """Sum of the stored 1d ``item_views`` counts over every item (every event counts once)."""
    from features.aggregations import make_aggregation
    from features.store import open_store

    agg = make_aggregation("count")
    total = 0
    with open_store(store_url, readonly=True) as store:
        ids = list(store.list_entity_ids("item", "views"))
        for table in store.get_block_tables("item", "views", ids):
            if table is None:
                continue
            key = next((f for f in table.features if f.startswith("item_views@")), None)
            if key is None:
                continue
            fb = table.feature_blocks(key)
            reps = agg.unpack(fb.blob, fb.offsets)
            total += int(reps["n"][fb.sizes == DAY].sum())
    return total


# -- comparison ---------------------------------------------------------------------------


class Truth:
    """Exact feature inputs of a block, from the generated events (for sketch fallbacks)."""

    def __init__(self, v: Views) -> None:
        self.v = v
        self._rows: dict[tuple[str, str], np.ndarray] = {}

    def values(self, feature: PeerFeature, key: BlockKey) -> list[Any]:
        """The column values of ``feature`` over the events of block ``key`` (filter applied)."""
        etype, entity, start, size = key
        rows = self._entity_rows(etype, entity)
        ts = self.v.ts[rows]
        rows = rows[(ts >= start) & (ts < start + size)]
        out = []
        for i in rows.tolist():
            value = feature.column(self.v.record(i))
            if value is not None:
                out.append(value)
        return out

    def _entity_rows(self, etype: str, entity: str) -> np.ndarray:
        rows = self._rows.get((etype, entity))
        if rows is None:
            k = int(entity[1:])
            column = {"item": self.v.item, "user": self.v.user, "author": self.v.author}[etype]
            rows = self._rows[(etype, entity)] = np.flatnonzero(column == k)
        return rows


def compare(tessera: dict[BlockKey, dict[str, Any]], peer: list[list[Any]],
            features: Sequence[PeerFeature], specs: Sequence[Any], truth: Truth) -> CheckReport:
    """Compare the sampled blocks of both outputs; every Tessera block needs a peer window."""
    from features.aggregations import build_aggregation

    by_name = {f.name: f for f in features}
    aggs = {s.name: build_aggregation(s) for s in specs}
    report = CheckReport()
    seen: set[BlockKey] = set()
    for etype, entity, start, size, values in peer:
        key = (etype, entity, start, size)
        seen.add(key)
        reps = tessera.get(key)
        if reps is None:  # dropped by the store's retention (or a difference: see below)
            report.not_stored[_size_name(size)] += 1
            continue
        for name, theirs in values.items():
            agg = aggs[name]
            rep = reps.get(name, agg.identity())
            problem = _compare_one(by_name[name], agg, rep, theirs, key, truth, report)
            report.compared[f"{name}/{_size_name(size)}"] += 1
            if problem:
                report.problems.append(f"{name} {etype} {entity} [{start}, +{_size_name(size)}): "
                                       f"{problem}")
    for key in sorted(set(tessera) - seen):
        etype, entity, start, size = key
        report.problems.append(f"{etype} {entity} [{start}, +{_size_name(size)}): Tessera has "
                               "a block, the peer no window")
    _check_coverage(report, specs)
    return report


def _compare_one(feature: PeerFeature, agg: Any, rep: Any, theirs: Any, key: BlockKey,
                 truth: Truth, report: CheckReport) -> str | None:
    kind = feature.aggregation
    if kind == "approx_distinct":
        return _compare_hll(feature, agg.finalize(rep), theirs, key, truth, report)
    if kind == "approx_quantile":
        return _compare_kll(feature, agg, rep, theirs, key, truth, report)
    ours = agg.finalize(rep)
    if kind == "last_n":
        ours = [[int(t), v] for t, v in rep]
        theirs = [[int(t), v] for t, v in theirs]
    elif kind == "count":
        ours, theirs = int(ours), int(theirs)
    elif ours is not None and theirs is not None:
        ours, theirs = float(ours), float(theirs)
    return None if ours == theirs else f"tessera {ours!r} != quix {theirs!r}"


def _compare_hll(feature: PeerFeature, ours: float, theirs: float, key: BlockKey,
                 truth: Truth, report: CheckReport) -> str | None:
    diff = abs(ours - theirs) / max(ours, theirs, 1.0)
    report.max_hll_diff = max(report.max_hll_diff, diff)
    if diff <= HLL_TOLERANCE:
        return None
    exact = len(set(truth.values(feature, key)))
    report.sketch_fallbacks[feature.name] += 1
    if all(abs(x - exact) <= HLL_TOLERANCE * max(exact, 1) for x in (ours, theirs)):
        return None
    return f"HLL estimates tessera {ours:.0f}, quix {theirs:.0f}, exact {exact}"


def _compare_kll(feature: PeerFeature, agg: Any, sketch: Any, theirs: float | None,
                 key: BlockKey, truth: Truth, report: CheckReport) -> str | None:
    ours = agg.finalize(sketch)
    if ours is None or theirs is None:
        return None if ours == theirs else f"tessera {ours!r} != quix {theirs!r}"
    q = agg.quantile
    eps = sketch.normalized_rank_error(False)
    if _rank_near(sketch, theirs, q, 2 * eps):
        return None
    report.sketch_fallbacks[feature.name] += 1
    values = np.sort(np.asarray(truth.values(feature, key), dtype=np.float64))
    if all(_exact_rank_near(values, x, q, 2 * eps) for x in (ours, theirs)):
        return None
    return (f"KLL {q} quantile tessera {ours}, quix {theirs}: more than {2 * eps:.3f} apart "
            "in rank")


def _rank_near(sketch: Any, x: float, q: float, tol: float) -> bool:
    lo, hi = sketch.get_rank(x, inclusive=False), sketch.get_rank(x, inclusive=True)
    return lo - tol <= q <= hi + tol


def _exact_rank_near(values: np.ndarray, x: float, q: float, tol: float) -> bool:
    n = max(len(values), 1)
    lo = np.searchsorted(values, x, side="left") / n
    hi = np.searchsorted(values, x, side="right") / n
    return lo - tol <= q <= hi + tol


def _check_coverage(report: CheckReport, specs: Sequence[Any]) -> None:
    for spec in specs:
        for size in spec.block_sizes:
            label = f"{spec.name}/{_size_name(size)}"
            if not report.compared[label]:
                report.problems.append(f"{label}: no block of the sample was in both outputs "
                                       "(nothing compared)")


def _size_name(size: int) -> str:
    from features.timeutil import format_duration

    return format_duration(size)


def pick_sample(v: Views, *, top_items: int = 5, items: int = 45, users: int = 100,
                authors: int = 20, seed: int = 7) -> dict[str, list[str]]:
    """Entities to compare: the busiest items, and random items, users and authors."""
    rng = np.random.default_rng(seed)
    ids, counts = np.unique(v.item, return_counts=True)
    top = ids[np.argsort(-counts)[:top_items]]
    rest = np.setdiff1d(ids, top)
    picked_items = np.concatenate([top, rng.choice(rest, min(items, len(rest)), replace=False)])

    def some(values: np.ndarray, k: int) -> list[int]:
        uniq = np.unique(values)
        return rng.choice(uniq, min(k, len(uniq)), replace=False).tolist()

    return {
        "item": [f"i{k}" for k in picked_items.tolist()],
        "user": [f"u{k}" for k in some(v.user, users)],
        "author": [f"a{k}" for k in some(v.item % AUTHORS, authors)],
    }

