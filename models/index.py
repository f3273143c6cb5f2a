"""Approximate nearest-neighbour index of item embeddings (hnswlib, inner product).

``ItemIndex`` maps string item ids to hnswlib's integer labels. Labels are never
reused: re-adding an id marks its old label deleted and adds the vector under a new
label; hnswlib then reuses the deleted slot's memory (``allow_replace_deleted``), so an
index under churn does not grow without bound. ``exact_search`` is the slow, obviously
correct reference the index is measured against (``recall_at_k``).

Scores are inner products (hnswlib's ``ip`` distance is ``1 - dot``). Vectors are stored
as given; normalize them first if the model expects cosine similarity.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import hnswlib
import numpy as np

from models.errors import ModelError

__all__ = [
    "EF_PER_K",
    "INDEX_FILE",
    "IDS_FILE",
    "IndexParams",
    "ItemIndex",
    "exact_search",
    "recall_at_k",
]

INDEX_FILE = "index.bin"
IDS_FILE = "ids.json"
_FORMAT = 1
_SPACE = "ip"
_MIN_CAPACITY = 1024
#: A search's candidate list is at least this many times ``k``.
EF_PER_K = 2
#: HNSW defaults (``IndexParams``): graph degree, build and search candidate lists
DEFAULT_M = 48
DEFAULT_EF_CONSTRUCTION = 400
DEFAULT_EF = 1024


@dataclass(frozen=True)
class IndexParams:
    """HNSW parameters, validated when made.

    Attributes:
        M: graph degree (higher: better recall, more memory); 2..512.
        ef_construction: candidate list size while building; >= 1.
        ef: candidate list size while searching (raised to ``k`` per query); >= 1.

    The defaults hold recall@100 near 0.98 with a one-query p99 about 1.2 ms (one core) on
    ``bench/models.py``'s 200,000 clustered unit vectors (64 clusters, dim 32), where the
    hundredth and hundred-and-first neighbours differ by ~1e-4 in score. Measured there:
    M=32, ef_construction=200, ef=256 (the old defaults): 0.74; M=32, 400, 512: 0.92;
    M=16, 400, 1024: 0.955; M=48, 400, 768: 0.96-0.97; M=48, 400, 1024: 0.98.
    """

    M: int = DEFAULT_M
    ef_construction: int = DEFAULT_EF_CONSTRUCTION
    ef: int = DEFAULT_EF

    def __post_init__(self) -> None:
        for name, low, high in (("M", 2, 512), ("ef_construction", 1, None), ("ef", 1, None)):
            value = getattr(self, name)
            if not isinstance(value, int) or value < low or (high is not None and value > high):
                bound = f"between {low} and {high}" if high is not None else f">= {low}"
                raise ModelError(
                    f"index parameter {name} must be an integer {bound}, got {value!r}"
                )


class ItemIndex:
    """An hnswlib inner-product index over item embeddings, keyed by item id.

    Every method holds one lock, so the index may be shared between a thread that adds
    and deletes and threads that search.
    """

    def __init__(self, index: hnswlib.Index, params: IndexParams, *, next_label: int = 0):
        """Wrap an initialized hnswlib index; use ``build`` or ``load`` instead."""
        self._index = index
        self.params = params
        self._label_of: dict[str, int] = {}
        self._id_of: dict[int, str] = {}
        self._next_label = next_label
        self._lock = threading.RLock()

    # ------------------------------------------------------------------ construction

    @classmethod
    def build(
        cls,
        ids: Sequence[str],
        vectors: np.ndarray,
        *,
        M: int = DEFAULT_M,
        ef_construction: int = DEFAULT_EF_CONSTRUCTION,
        ef: int = DEFAULT_EF,
    ) -> ItemIndex:
        """Build an index from ``ids`` and their ``vectors`` (shape ``(len(ids), dim)``) in one batch.

        Raises:
            ModelError: bad parameters, duplicate ids, or vectors of the wrong shape or
                with non-finite values.
        """
        params = IndexParams(M=M, ef_construction=ef_construction, ef=ef)
        matrix = np.asarray(vectors)
        if matrix.ndim != 2 or matrix.shape[1] < 1:
            raise ModelError(f"vectors must be a 2-D array (items, dim), got shape {matrix.shape}")
        dim = int(matrix.shape[1])
        id_list = _check_ids(ids)
        matrix = _check_vectors(matrix, dim, len(id_list))
        raw = hnswlib.Index(space=_SPACE, dim=dim)
        raw.init_index(
            max_elements=max(len(id_list), _MIN_CAPACITY),
            M=params.M,
            ef_construction=params.ef_construction,
            allow_replace_deleted=True,
        )
        raw.set_ef(params.ef)
        index = cls(raw, params)
        index._add_new(id_list, matrix)
        return index

    @classmethod
    def load(cls, directory: Path) -> ItemIndex:
        """Load an index saved by ``save`` from ``directory``.

        Raises:
            ModelError: a file is missing, or ``ids.json`` is malformed or does not match
                ``index.bin``.
        """
        directory = Path(directory)
        try:
            meta = json.loads((directory / IDS_FILE).read_text())
        except FileNotFoundError as exc:
            raise ModelError(f"no saved index in {directory}: {IDS_FILE} is missing") from exc
        except ValueError as exc:
            raise ModelError(f"{directory / IDS_FILE} is not valid JSON: {exc}") from exc
        if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
            raise ModelError(
                f"{directory / IDS_FILE}: unsupported format {meta.get('format') if isinstance(meta, dict) else meta!r}"
                f" (expected {_FORMAT}); rebuild the index"
            )
        if not (directory / INDEX_FILE).is_file():
            raise ModelError(f"no saved index in {directory}: {INDEX_FILE} is missing")
        ids, labels = meta["ids"], meta["labels"]
        if len(ids) != len(labels) or len(set(ids)) != len(ids):
            raise ModelError(f"{directory / IDS_FILE}: ids and labels do not pair up one to one")
        params = IndexParams(M=meta["M"], ef_construction=meta["ef_construction"], ef=meta["ef"])
        raw = hnswlib.Index(space=_SPACE, dim=int(meta["dim"]))
        raw.load_index(str(directory / INDEX_FILE), allow_replace_deleted=True)
        raw.set_ef(params.ef)
        if labels and max(labels) >= int(meta["next_label"]):
            raise ModelError(f"{directory / IDS_FILE}: a label is >= next_label; rebuild the index")
        index = cls(raw, params, next_label=int(meta["next_label"]))
        index._label_of = dict(zip(ids, labels))
        index._id_of = dict(zip(labels, ids))
        if len(index._id_of) != len(labels):
            raise ModelError(f"{directory / IDS_FILE}: duplicate labels; rebuild the index")
        return index

    # ------------------------------------------------------------------ mutation

    def add(self, ids: Sequence[str], vectors: np.ndarray) -> None:
        """Add items; an id already present gets its vector replaced.

        Raises:
            ModelError: duplicate ids in the batch, or vectors of the wrong shape.
        """
        id_list = _check_ids(ids)
        matrix = _check_vectors(np.asarray(vectors), self.dim, len(id_list))
        if not id_list:
            return
        with self._lock:
            self._delete_labels([self._label_of[i] for i in id_list if i in self._label_of])
            self._add_new(id_list, matrix)

    def delete(self, ids: Sequence[str]) -> int:
        """Remove items from search results; unknown ids are ignored. Return how many were removed."""
        with self._lock:
            labels = [self._label_of[i] for i in ids if i in self._label_of]
            self._delete_labels(labels)
            return len(labels)

    # ------------------------------------------------------------------ queries

    def search(
        self, vectors: np.ndarray, k: int, *, ef: int | None = None
    ) -> tuple[list[list[str]], np.ndarray]:
        """Return the ``k`` items of highest inner product for each query vector.

        The search's candidate list is ``max(ef, EF_PER_K * k)``: a list only as long as
        ``k`` loses recall for large ``k``; how long it must be depends on the data (see
        ``IndexParams``).

        Args:
            vectors: queries, shape ``(n, dim)`` (or ``(dim,)`` for one query).
            k: results per query; fewer come back if the index holds fewer live items.
            ef: candidate list size for this call (default ``params.ef``).

        Returns:
            ``(ids, scores)``: ``ids[q]`` best first, and ``scores`` of shape
            ``(n, min(k, len(self)))`` with the inner products.
        """
        if not isinstance(k, int) or k < 1:
            raise ModelError(f"k must be an integer >= 1, got {k!r}")
        queries = np.asarray(vectors)
        if queries.ndim == 1:
            queries = queries[None, :]
        queries = _check_vectors(queries, self.dim, queries.shape[0], what="query vectors")
        with self._lock:
            k_eff = min(k, len(self._id_of))
            if k_eff == 0 or queries.shape[0] == 0:
                return [[] for _ in range(queries.shape[0])], np.zeros(
                    (queries.shape[0], k_eff), dtype=np.float32
                )
            ef = max(ef if ef is not None else self.params.ef, EF_PER_K * k_eff)
            self._index.set_ef(ef)
            try:
                labels, distances = self._index.knn_query(queries, k=k_eff)
            except RuntimeError:
                # Too few live items reachable with this ef (many deleted): search wider.
                self._index.set_ef(max(ef, self._index.get_current_count()))
                labels, distances = self._index.knn_query(queries, k=k_eff)
            finally:
                self._index.set_ef(self.params.ef)
            id_of = self._id_of
            ids = [[id_of[label] for label in row] for row in labels.tolist()]
        return ids, (1.0 - distances).astype(np.float32)

    def items(self) -> tuple[list[str], np.ndarray]:
        """Return every live item's id and vector, shape ``(len(self), dim)``."""
        with self._lock:
            labels = list(self._id_of)
            ids = [self._id_of[label] for label in labels]
            if not labels:
                return ids, np.zeros((0, self.dim), dtype=np.float32)
            return ids, np.asarray(self._index.get_items(labels), dtype=np.float32)

    @property
    def dim(self) -> int:
        """Return the vectors' dimension."""
        return int(self._index.dim)

    def __len__(self) -> int:
        return len(self._label_of)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._label_of

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> None:
        """Write ``index.bin`` and ``ids.json`` into ``directory`` (created if missing).

        Each file is written under a temporary name and renamed into place; publish the
        directory with ``ModelRegistry.publish`` for an atomic, versioned copy.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        with self._lock:
            ids = list(self._label_of)
            meta = {
                "format": _FORMAT,
                "space": _SPACE,
                "dim": self.dim,
                "M": self.params.M,
                "ef_construction": self.params.ef_construction,
                "ef": self.params.ef,
                "next_label": self._next_label,
                "count": len(ids),
                "ids": ids,
                "labels": [self._label_of[i] for i in ids],
            }
            tmp_index = directory / f".{INDEX_FILE}.tmp"
            self._index.save_index(str(tmp_index))
        tmp_ids = directory / f".{IDS_FILE}.tmp"
        tmp_ids.write_text(json.dumps(meta))
        os.replace(tmp_index, directory / INDEX_FILE)
        os.replace(tmp_ids, directory / IDS_FILE)

    # ------------------------------------------------------------------ internals

    def _add_new(self, ids: list[str], matrix: np.ndarray) -> None:
        if not ids:
            return
        with self._lock:
            needed = self._index.get_current_count() + len(ids)
            capacity = self._index.get_max_elements()
            if needed > capacity:
                self._index.resize_index(max(needed, capacity * 2))
            labels = np.arange(self._next_label, self._next_label + len(ids), dtype=np.int64)
            self._index.add_items(matrix, labels, replace_deleted=True)
            self._next_label += len(ids)
            for item_id, label in zip(ids, labels.tolist()):
                self._label_of[item_id] = label
                self._id_of[label] = item_id

    def _delete_labels(self, labels: list[int]) -> None:
        for label in labels:
            self._index.mark_deleted(label)
            del self._label_of[self._id_of.pop(label)]


def exact_search(
    ids: Sequence[str], vectors: np.ndarray, queries: np.ndarray, k: int, *, chunk: int = 1024
) -> tuple[list[list[str]], np.ndarray]:
    """Return the exact top-``k`` items by inner product: the reference for ``ItemIndex.search``.

    Same return shape as ``ItemIndex.search``; brute force with numpy, in query chunks.
    """
    items = np.asarray(vectors, dtype=np.float32)
    q = np.asarray(queries, dtype=np.float32)
    if q.ndim == 1:
        q = q[None, :]
    k_eff = min(k, items.shape[0])
    out_ids: list[list[str]] = []
    out_scores = np.zeros((q.shape[0], k_eff), dtype=np.float32)
    id_arr = np.asarray(list(ids), dtype=object)
    for start in range(0, q.shape[0], chunk):
        scores = q[start : start + chunk] @ items.T
        if k_eff < items.shape[0]:
            top = np.argpartition(-scores, k_eff - 1, axis=1)[:, :k_eff]
        else:
            top = np.tile(np.arange(items.shape[0]), (scores.shape[0], 1))
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)
        out_scores[start : start + chunk] = np.take_along_axis(top_scores, order, axis=1)
        out_ids.extend(id_arr[row].tolist() for row in top)
    return out_ids, out_scores


def recall_at_k(index: ItemIndex, queries: np.ndarray, k: int) -> float:
    """Return the mean fraction of the exact top-``k`` that ``index.search`` also returns."""
    ids, vectors = index.items()
    if not ids:
        raise ModelError("recall_at_k needs a non-empty index")
    exact, _ = exact_search(ids, vectors, queries, k)
    approx, _ = index.search(queries, k)
    k_eff = min(k, len(ids))
    hits = [len(set(a) & set(e)) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k_eff)


def _check_ids(ids: Sequence[str]) -> list[str]:
    id_list = list(ids)
    bad = next((i for i in id_list if not isinstance(i, str)), None)
    if bad is not None:
        raise ModelError(f"item ids must be strings, got {type(bad).__name__} {bad!r}")
    if len(set(id_list)) != len(id_list):
        seen: set[str] = set()
        dup = next(i for i in id_list if i in seen or seen.add(i))  # type: ignore[func-returns-value]
        raise ModelError(f"item id {dup!r} appears more than once in one batch; pass each id once")
    return id_list


def _check_vectors(matrix: np.ndarray, dim: int, rows: int, *, what: str = "vectors") -> np.ndarray:
    if matrix.ndim != 2 or matrix.shape != (rows, dim):
        raise ModelError(f"{what} must have shape ({rows}, {dim}), got {matrix.shape}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if not np.isfinite(matrix).all():
        raise ModelError(f"{what} contain NaN or infinite values; fix the embeddings")
    return matrix
