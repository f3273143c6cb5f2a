"""Assemble window values from blocks, and the brute-force reference they are tested against.

``select_cover_rows`` picks, from one feature's block rows, exactly the blocks of a
``BlockCover``; ``assemble_rep`` combines them. A block missing from the rows means no
events fell in it, which is the identity rep, so missing blocks need no special case.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from features.aggregations.base import Aggregation
from features.tiling import BlockCover


def select_cover_rows(starts: np.ndarray, sizes: np.ndarray, cover: BlockCover) -> np.ndarray:
    """Return the indices of the rows whose ``(start, size)`` is a block of ``cover``.

    Args:
        starts, sizes: int64 arrays, one entry per stored block of one feature and entity.
    """
    if len(starts) == 0 or not cover.runs:
        return np.zeros(0, dtype=np.int64)
    mask = np.zeros(len(starts), dtype=bool)
    for run in cover.runs:
        mask |= (sizes == run.size) & (starts >= run.start) & (starts < run.end)
    return np.flatnonzero(mask)


def assemble_rep(
    agg: Aggregation, unpacked: Any, starts: np.ndarray, sizes: np.ndarray, cover: BlockCover
) -> Any:
    """Combine the reps of the blocks of ``cover`` found in one feature's rows.

    Args:
        unpacked: the feature's reps as returned by ``agg.unpack`` (row-aligned with starts).
    """
    rows = select_cover_rows(starts, sizes, cover)
    return agg.reduce_rows(unpacked, rows)


def aggregate_raw(
    agg: Aggregation, values: Any, ts: np.ndarray, start: int, end: int
) -> Any:
    """Reference: aggregate the events with ``start <= ts < end`` directly, one by one."""
    rep = agg.identity()
    vals = values if values is not None else [None] * len(ts)
    for v, t in zip(list(vals), np.asarray(ts).tolist()):
        if start <= t < end:
            rep = agg.combine(rep, agg.map(v, t))
    return rep


def build_blocks(
    agg: Aggregation, values: Any, ts: np.ndarray, sizes: tuple[int, ...]
) -> dict[int, tuple[np.ndarray, Any]]:
    """Aggregate events into blocks of every size: ``{size: (starts, batch reps)}``.

    The batch path of the streaming flow and the batch job; tested against ``aggregate_raw``.
    """
    ts = np.asarray(ts, dtype=np.int64)
    out: dict[int, tuple[np.ndarray, Any]] = {}
    for size in sizes:
        block_starts = ts - ts % size
        uniq, group = np.unique(block_starts, return_inverse=True)
        vals = None if values is None else (values if isinstance(values, np.ndarray)
                                            else np.asarray(values, dtype=object))
        out[size] = (uniq, agg.group_reduce(group.astype(np.int64), len(uniq), vals, ts))
    return out


_SLOT_BITS = 32


class BlockIndex:
    """One feature's fixed-width blocks for many entities, searchable by (entity, size, start).

    Rows are sorted by a composite int64 key so that the blocks of one cover run of one
    entity are a contiguous range found by ``np.searchsorted``; ``assemble`` then reduces
    all ranges of all entities in a few vectorized calls. This is the many-entity read path.
    """

    def __init__(
        self,
        entity_rows: np.ndarray,
        sizes: np.ndarray,
        starts: np.ndarray,
        reps: np.ndarray,
        block_sizes: tuple[int, ...],
    ) -> None:
        self.block_sizes = tuple(block_sizes)
        self.finest = self.block_sizes[0]
        self.base = int(starts.min()) if len(starts) else 0
        self.base -= self.base % self.block_sizes[-1]
        size_idx = np.searchsorted(np.asarray(self.block_sizes), sizes)
        keys = self._key(np.asarray(entity_rows, np.int64), size_idx, np.asarray(starts, np.int64))
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.reps = reps[order]
        self._prefix: dict[str, np.ndarray] | None = None

    def _key(self, entity: np.ndarray, size_idx: np.ndarray | int, start: np.ndarray | int):
        slot = (np.asarray(start, np.int64) - self.base) // self.finest
        slot = np.clip(slot, 0, (1 << _SLOT_BITS) - 1)  # outside the stored span: no blocks
        return ((entity * len(self.block_sizes) + size_idx) << _SLOT_BITS) + slot

    def assemble_runs(
        self,
        agg: Aggregation,
        entity_rows: np.ndarray,
        runs: list[tuple[int, np.ndarray, np.ndarray]],
        positions: dict[int, list[tuple[np.ndarray, np.ndarray]]] | None = None,
    ) -> np.ndarray:
        """One rep per query row: its entity's blocks in its own cover (``cover_runs_many``).

        Each query row has its own interval, so thousands of point-in-time reads at
        different watermarks are answered in a few vectorized calls. Calls for other windows
        of the same rows may pass one ``positions`` dict: a run boundary they share (the
        recent edge of every window ending at the same time) is then searched once.
        """
        from features.aggregations.numeric import _Extremum, prefix_sums, reduce_ranges

        if self._prefix is None and not isinstance(agg, _Extremum):
            self._prefix = prefix_sums(self.reps)
        entity_rows = np.asarray(entity_rows, dtype=np.int64)
        known = {} if positions is None else positions
        out = agg.identity_array(len(entity_rows))
        for size, lo_t, hi_t in runs:
            if size not in self.block_sizes:
                continue
            si = self.block_sizes.index(size)
            lo = self._positions(entity_rows, si, lo_t, known)
            hi = np.maximum(self._positions(entity_rows, si, hi_t, known), lo)
            out = agg.combine_arrays(out, reduce_ranges(agg, self.reps, lo, hi, self._prefix))
        return out

    def _positions(self, entity_rows: np.ndarray, si: int, times: np.ndarray,
                   known: dict[int, list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
        """Where each row's first block of size ``si`` at or after its time is, searched
        once per distinct ``times`` array (comparing arrays costs far less than a search)."""
        seen = known.setdefault(si, [])
        for t, pos in seen:
            if t is times or np.array_equal(t, times):
                return pos
        pos = np.searchsorted(self.keys, self._key(entity_rows, si, times))
        seen.append((times, pos))
        return pos

    def assemble(self, agg: Aggregation, entity_rows: np.ndarray, cover: BlockCover) -> np.ndarray:
        """Return one rep per entity in ``entity_rows``: the combine of its blocks in ``cover``."""
        from features.aggregations.numeric import _Extremum, prefix_sums, reduce_ranges

        if self._prefix is None and not isinstance(agg, _Extremum):
            self._prefix = prefix_sums(self.reps)

        entity_rows = np.asarray(entity_rows, dtype=np.int64)
        out = np.zeros(len(entity_rows), dtype=agg.rep_dtype)
        first = True
        for run in cover.runs:
            si = self.block_sizes.index(run.size)
            lo = np.searchsorted(self.keys, self._key(entity_rows, si, run.start))
            hi = np.searchsorted(self.keys, self._key(entity_rows, si, run.end))
            part = reduce_ranges(agg, self.reps, lo, hi, self._prefix)
            out = part if first else agg.combine_arrays(out, part)
            first = False
        if first:
            out = agg.to_array([agg.identity()] * len(entity_rows))
        return out
