"""A map from int64 keys to row numbers, in numpy: batch lookups and inserts, no Python per key.

The streaming block state addresses each open block by a composite int64 key and needs, for
every batch, the row of thousands of keys at once. A Python dict costs one bytecode loop per
key; ``KeyIndex`` keeps the keys sorted (``np.searchsorted`` for lookups) in two levels, a
large main level and a small delta level that new keys go into, merged when the delta grows
past a fraction of the main level (amortized O(log n) per insert, like an LSM tree).
"""

from __future__ import annotations

import numpy as np

_MIN_DELTA = 4096


class KeyIndex:
    """Sorted int64 keys -> int64 rows. Keys are unique; rows are whatever the owner assigns."""

    def __init__(self, keys: np.ndarray | None = None, rows: np.ndarray | None = None) -> None:
        keys = np.zeros(0, np.int64) if keys is None else np.asarray(keys, np.int64)
        rows = np.arange(len(keys), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        order = np.argsort(keys, kind="stable")
        self._main_keys, self._main_rows = keys[order], rows[order]
        self._delta_keys = np.zeros(0, np.int64)
        self._delta_rows = np.zeros(0, np.int64)

    def __len__(self) -> int:
        return len(self._main_keys) + len(self._delta_keys)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Return the row of each key, -1 where the key is absent."""
        keys = np.asarray(keys, np.int64)
        out = _find(self._main_keys, self._main_rows, keys)
        if len(self._delta_keys):
            miss = out < 0
            if miss.any():
                out[miss] = _find(self._delta_keys, self._delta_rows, keys[miss])
        return out

    def insert(self, keys: np.ndarray, rows: np.ndarray) -> None:
        """Add keys (unique, not present yet) with their rows."""
        if not len(keys):
            return
        keys = np.asarray(keys, np.int64)
        order = np.argsort(keys, kind="stable")
        self._delta_keys, self._delta_rows = _merge(
            self._delta_keys, self._delta_rows, keys[order], np.asarray(rows, np.int64)[order])
        if len(self._delta_keys) > max(_MIN_DELTA, len(self._main_keys) // 8):
            self._main_keys, self._main_rows = _merge(
                self._main_keys, self._main_rows, self._delta_keys, self._delta_rows)
            self._delta_keys = np.zeros(0, np.int64)
            self._delta_rows = np.zeros(0, np.int64)

    def remap(self, old_to_new: np.ndarray) -> None:
        """Renumber rows (``old_to_new[row]``); keys whose new row is -1 are dropped.

        Dropping entries keeps both levels sorted, so this is one pass, no sort.
        """
        for level in ("main", "delta"):
            keys = getattr(self, f"_{level}_keys")
            rows = old_to_new[getattr(self, f"_{level}_rows")]
            keep = rows >= 0
            setattr(self, f"_{level}_keys", keys[keep])
            setattr(self, f"_{level}_rows", rows[keep])


def _merge(a_keys: np.ndarray, a_rows: np.ndarray, b_keys: np.ndarray, b_rows: np.ndarray
           ) -> tuple[np.ndarray, np.ndarray]:
    """Merge two sorted key arrays (and their rows) in linear time."""
    if not len(a_keys):
        return b_keys, b_rows
    pos = np.searchsorted(a_keys, b_keys)
    return np.insert(a_keys, pos, b_keys), np.insert(a_rows, pos, b_rows)


def _find(sorted_keys: np.ndarray, rows: np.ndarray, keys: np.ndarray) -> np.ndarray:
    if not len(sorted_keys):
        return np.full(len(keys), -1, np.int64)
    pos = np.searchsorted(sorted_keys, keys)
    pos_c = np.minimum(pos, len(sorted_keys) - 1)
    hit = sorted_keys[pos_c] == keys
    return np.where(hit, rows[pos_c], -1)
