"""In-memory feature snapshots: many entities' numeric feature values at one window end.

A window value is a function of ``(window, end)`` alone (``features.tiling``), so the values
of every item (and of each item's author) at one end can be computed once, held as a dense
float32 matrix, and gathered by every request that reads at that end: hydration of
thousands of candidates is then one hash lookup per id and one fancy index, with values equal
to what ``FeatureClient.get_features(..., end=end)`` returns for the same ids (it is built
with exactly that call).

A snapshot is immutable once built; the holder swaps in the next one with one assignment
when the watermark moves the end (``serving.snapshots``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import repeat

import numpy as np

from features.client import FeatureClient

BUILD_CHUNK = 5_000
"""Entities read per ``get_features`` call while building (the builder yields between)."""


@dataclass(frozen=True)
class FeatureSnapshot:
    """Numeric features of many entities at one window end, rows sorted by id.

    Attributes:
        entity_type: the type of ``ids`` (the row entities, e.g. ``item``).
        end: the window end every value was computed at (log it as the watermark).
        names: column names: the entity's own features, then ``joined`` ones.
        ids: sorted ids (numpy unicode), one row each.
        values: float32 [len(ids), len(names)] (defaults where no data).
        missing: bool, same shape: the default was used.
        build_s: seconds the build took.
    """

    entity_type: str
    end: int
    names: tuple[str, ...]
    ids: np.ndarray
    values: np.ndarray
    missing: np.ndarray
    build_s: float = 0.0

    @property
    def nbytes(self) -> int:
        """Memory held by the arrays."""
        return int(self.ids.nbytes + self.values.nbytes + self.missing.nbytes)

    @cached_property
    def row_of(self) -> dict[str, int]:
        """``{id: row}``, built on first use (lookups by id; serving's requests gather by
        catalog position instead); it is not pickled with the arrays unless built."""
        return dict(zip(self.ids.tolist(), range(len(self.ids))))

    def rows(self, ids: Sequence[str] | np.ndarray) -> np.ndarray:
        """The row of each id, -1 where the snapshot has none.

        One hash lookup per id through ``map`` (C): for 2,000 ids of 100,000 about 3x
        faster than a ``searchsorted`` over the unicode ids, which first converts them.
        """
        if len(ids) == 0 or len(self.ids) == 0:
            return np.full(len(ids), -1, dtype=np.int64)
        q = ids.tolist() if isinstance(ids, np.ndarray) else ids
        get = self.row_of.get
        return np.fromiter(map(get, q, repeat(-1, len(q))), dtype=np.int64, count=len(q))

    def columns(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        """``{name: values of rows}`` for rows that are all present (>= 0)."""
        block = self.values[rows]
        return {n: block[:, j] for j, n in enumerate(self.names)}


def build_snapshot(client: FeatureClient, entity_type: str, ids: Sequence[str],
                   names: Sequence[str], end: int, *,
                   joined: tuple[str, Sequence[str], Sequence[str]] | None = None,
                   pause_s: float = 0.001) -> FeatureSnapshot:
    """Read ``names`` of ``ids`` at ``end`` into a snapshot, in chunks.

    ``joined`` = ``(entity type, key per id, names)`` adds the features of a related entity
    (each item's author) as further columns, read at the same end: ``key[i]`` is the related
    entity of ``ids[i]`` (an empty key reads as no data, its features' defaults). Between
    chunks the builder sleeps ``pause_s`` so request threads get the interpreter.

    Raises whatever ``get_features`` raises (unknown names, an end the store cannot serve);
    every name must be numeric (a ``last_n`` list has no matrix cell).
    """
    t0 = time.perf_counter()
    order = np.argsort(np.asarray(ids, dtype=str), kind="stable")
    uniq_ids = np.asarray(ids, dtype=str)[order]
    keep = np.ones(len(uniq_ids), dtype=bool)
    keep[1:] = uniq_ids[1:] != uniq_ids[:-1]
    order, uniq_ids = order[keep], uniq_ids[keep]
    id_list = uniq_ids.tolist()
    key_list = np.asarray(joined[1])[order].tolist() if joined is not None else []
    all_names = tuple(names) + (tuple(joined[2]) if joined is not None else ())
    values = np.zeros((len(id_list), len(all_names)), dtype=np.float32)
    missing = np.zeros(values.shape, dtype=bool)
    for lo in range(0, len(id_list), BUILD_CHUNK):
        hi = min(lo + BUILD_CHUNK, len(id_list))
        parts = []
        if names:
            parts.append(client.get_features(entity_type, id_list[lo:hi], list(names), end=end))
        if joined is not None and joined[2]:
            parts.append(client.get_features(joined[0], key_list[lo:hi], list(joined[2]),
                                             end=end))
        col = 0
        for fv in parts:
            if fv.lists:
                raise ValueError(f"snapshot features must be numeric; {sorted(fv.lists)} are lists")
            k = fv.values.shape[1]
            values[lo:hi, col:col + k] = fv.values
            missing[lo:hi, col:col + k] = fv.missing
            col += k
        if pause_s:
            time.sleep(pause_s)
    return FeatureSnapshot(entity_type, int(end), all_names, uniq_ids, values, missing,
                           time.perf_counter() - t0)
