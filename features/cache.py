"""A bounded in-process cache of feature rows with per-entity-type TTLs and hit counters."""

from __future__ import annotations

import contextlib
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass
class CacheStats:
    """Hit and miss counters of one entity type."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        """Hits over lookups (0 when there were none)."""
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


@dataclass
class FeatureCache:
    """LRU cache of feature rows, bounded in entries, with a TTL per entity type.

    Entries are keyed by the caller (the feature client keys them by the window end, so a
    hit is exactly the value a fresh read would give; the TTL only bounds memory and how
    long a row outlives its watermark).

    Args:
        ttl_ms: TTL per entity type, e.g. ``{"user": 5_000, "item": 60_000}``.
        default_ttl_ms: TTL of entity types not listed.
        max_entries: bound on entries over all entity types (least recently used go first).
        clock: monotonic milliseconds (tests pass a fake).
    """

    ttl_ms: Mapping[str, int] = field(default_factory=lambda: {"user": 5_000, "item": 60_000})
    default_ttl_ms: int = 30_000
    max_entries: int = 200_000
    clock: Callable[[], float] = field(default=lambda: time.monotonic() * 1000)
    _data: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    stats: dict[str, CacheStats] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"max_entries must be >= 1, got {self.max_entries}")
        for et, ttl in {**self.ttl_ms, "*": self.default_ttl_ms}.items():
            if ttl <= 0:
                raise ValueError(f"TTL of {et!r} must be positive, got {ttl} ms")

    def _stats(self, entity_type: str) -> CacheStats:
        st = self.stats.get(entity_type)
        if st is None:
            st = self.stats[entity_type] = CacheStats()
        return st

    # Request threads share one cache. Each OrderedDict call is atomic under the GIL, but
    # another thread may remove a key between two of them (an expired entry seen by two
    # lookups at once): every removal and reordering tolerates a key already gone.

    def get(self, entity_type: str, key: Hashable) -> Any | None:
        """Return the cached value, or None when absent or expired. Safe to call from
        several threads at once."""
        st = self._stats(entity_type)
        item = self._data.get((entity_type, key))
        if item is None or item[0] < self.clock():
            if item is not None:
                self._data.pop((entity_type, key), None)
            st.misses += 1
            return None
        with contextlib.suppress(KeyError):  # removed meanwhile: still a valid hit
            self._data.move_to_end((entity_type, key))
        st.hits += 1
        return item[1]

    def put(self, entity_type: str, key: Hashable, value: Any) -> None:
        """Store ``value`` for the entity type's TTL, evicting the least recently used.
        Safe to call from several threads at once."""
        ttl = self.ttl_ms.get(entity_type, self.default_ttl_ms)
        self._data[(entity_type, key)] = (self.clock() + ttl, value)
        with contextlib.suppress(KeyError):
            self._data.move_to_end((entity_type, key))
        while len(self._data) > self.max_entries:
            try:
                (et, _), _ = self._data.popitem(last=False)
            except KeyError:  # emptied by another thread
                break
            self._stats(et).evictions += 1

    def __len__(self) -> int:
        return len(self._data)

    def clear(self) -> None:
        """Drop every entry (counters are kept)."""
        self._data.clear()
