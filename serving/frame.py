"""The catalog as columns: candidates are positions in it, their metadata is gathered.

A feed request handles ~2,000 candidates. Looked up one id at a time (author, topic, feature
snapshot row, hash bucket of each id column, per-topic counts of the cross features), each
pass was a Python dict probe per candidate over objects scattered in memory; together they
were about a third of a request's CPU. A ``CandidateFrame`` is built once per catalog
refresh, off the request path: every item of the catalog snapshot at a position, its author
and topic as codes into small tables, and the generator lists as position arrays. A request
then merges position arrays and gathers; hash buckets and snapshot rows are looked up per
table or per frame, once (``models.features.CodeTable``, ``SnapshotKeeper.rows_at``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from itertools import repeat

import numpy as np

from models.features import CodedColumn, CodeTable

#: candidate sources, by code (a candidate keeps the first source that offered it)
SOURCES = ("ann", "topics", "follow", "trending", "fresh")
SOURCE_CODE = {s: k for k, s in enumerate(SOURCES)}

_NO_POSITIONS = np.zeros(0, dtype=np.int64)


def positions_in(ids_sorted: np.ndarray, ids: Sequence[str] | np.ndarray) -> np.ndarray:
    """Position of each of ``ids`` in ``ids_sorted`` (a sorted unicode array); -1 if absent."""
    if not len(ids) or not len(ids_sorted):
        return np.full(len(ids), -1, dtype=np.int64)
    q = ids if isinstance(ids, np.ndarray) and ids.dtype.kind == "U" else np.asarray(ids, dtype=str)
    at = np.minimum(np.searchsorted(ids_sorted, q), len(ids_sorted) - 1)
    return np.where(ids_sorted[at] == q, at, -1).astype(np.int64)


def factorize(values: list[str]) -> CodedColumn:
    """``values`` dictionary-encoded: codes in first-seen order, the distinct values a table
    (a numpy unicode array)."""
    index: dict[str, int] = {}
    codes = np.fromiter(map(index.setdefault, values, map(len, repeat(index, len(values)))),
                        dtype=np.int64, count=len(values))
    return CodedColumn(codes, CodeTable(np.array(list(index), dtype=str)))


@dataclass(frozen=True)
class CandidateFrame:
    """Every item of one catalog snapshot at a position (ids sorted), with its metadata.

    Attributes:
        ids: the item ids, sorted (numpy unicode): position ``p`` is ``ids[p]``.
        items: the ids as a code table (their hash buckets are kept there).
        authors, topics: author and topic of every position ('' when unknown), as read from
            the catalog at ``catalog_version``.
        trending, fresh: the generator lists as positions, in rank order.
        by_topic: each topic's list as positions, in popularity order.
        catalog_version: the catalog's change count when the metadata was read; items
            changed since are patched per request batch (``ItemCatalog.candidate_columns``).
    """

    ids: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype="<U1"))
    items: CodeTable = field(default_factory=lambda: CodeTable(np.zeros(0, dtype="<U1")))
    authors: CodedColumn = field(default_factory=lambda: factorize([]))
    topics: CodedColumn = field(default_factory=lambda: factorize([]))
    trending: np.ndarray = field(default_factory=lambda: _NO_POSITIONS)
    fresh: np.ndarray = field(default_factory=lambda: _NO_POSITIONS)
    by_topic: dict[str, np.ndarray] = field(default_factory=dict)
    catalog_version: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def positions(self, ids: Sequence[str]) -> np.ndarray:
        """The position of each of ``ids`` (-1 for an item not in the frame)."""
        return positions_in(self.ids, ids)

    def ids_at(self, pos: np.ndarray) -> list[str]:
        """The item ids at ``pos``."""
        return self.ids[pos].tolist()


def build_frame(ids: np.ndarray, authors: list[str], topics: list[str], *,
                trending: Sequence[str], fresh: Sequence[str],
                by_topic: dict[str, Sequence[str]], catalog_version: int) -> CandidateFrame:
    """A frame over ``ids`` (sorted unicode) with each one's author and topic (same order),
    and the generator lists (ids of ``ids``; any other id is left out)."""

    def pos(lst: Sequence[str]) -> np.ndarray:
        p = positions_in(ids, lst)
        return p[p >= 0]

    return CandidateFrame(ids, CodeTable(ids), factorize(authors), factorize(topics),
                          pos(trending), pos(fresh), {t: pos(v) for t, v in by_topic.items()},
                          catalog_version)


def _same_table(old: CodedColumn, new: CodedColumn) -> CodedColumn:
    """``new``, over ``old``'s table when the two tables hold the same values."""
    if old.table is new.table or (len(old.table) == len(new.table)
                                  and np.array_equal(old.table.values, new.table.values)):
        return CodedColumn(new.codes, old.table)
    return new


def carry_over(old: CandidateFrame, new: CandidateFrame) -> CandidateFrame:
    """``new`` sharing ``old``'s ids array and code tables wherever they hold the same values.

    Every catalog refresh builds a new frame, nearly always over the same items. What
    serving computed per table (hash buckets of the ids, authors and topics; the value
    index) and per ids array (a snapshot's rows are its positions when the arrays are one
    object) then carries over instead of being computed again by the first requests on the
    new frame: 20-30 ms each at 100,000 items, a burst of slow requests every refresh.
    """
    if not len(old.ids) or len(old.ids) != len(new.ids):
        return new
    if old.ids is not new.ids and not np.array_equal(old.ids, new.ids):
        return new
    return replace(new, ids=old.ids, items=old.items,
                   authors=_same_table(old.authors, new.authors),
                   topics=_same_table(old.topics, new.topics))
