"""Feature preprocessing shared by training and serving: one schema, one set of functions.

A :class:`FeatureSchema` lists, in model-input order, the dense features (each with its
``log1p`` flag and standardization stats), the categorical fields (each hashed into its
own number of buckets) and the sequence field (item ids, hashed with the item-id buckets,
cut or padded to ``sequence_length``). It is fitted on the training rows, stored as JSON in
the model manifest and read back by serving, so both sides turn the same rows into the
same tensors.

Rows are columnar: a mapping ``{name: sequence of values}`` (a :data:`Batch`), or a list
of row dicts (turned columnar with :func:`columnar`). Missing values are ``None`` or NaN;
a missing dense value becomes the feature's ``default`` before the transform.

Hashing reserves bucket 0 for "missing / padding": ``hash_ids`` maps an id to
``1 + crc32(utf-8 id) % (buckets - 1)``, which is stable across processes and machines.
"""

from __future__ import annotations

import json
import math
import zlib
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from itertools import repeat
from typing import Any, ClassVar

import numpy as np

from features.errors import TesseraError

__all__ = [
    "Batch",
    "FeatureSchemaError",
    "CategoricalField",
    "CodeTable",
    "CodedColumn",
    "DenseFeature",
    "FeatureSchema",
    "DenseStats",
    "CrossFeature",
    "KeyRate",
    "KeyShare",
    "key_counts",
    "key_share",
    "categorical_matrix",
    "columnar",
    "dense_matrix",
    "hash_ids",
    "select_dense",
    "sequence_matrix",
]

Batch = Mapping[str, Any]
"""Columnar rows: ``{column name: sequence or numpy array of values}``, all one length."""

SCHEMA_FORMAT = 1


class FeatureSchemaError(TesseraError, ValueError):
    """A feature schema, or a value given to build one, is invalid."""


class CodeTable:
    """The distinct values of dictionary-encoded columns (as Arrow's ``DictionaryArray``),
    with each value's hash bucket kept per bucket count once computed.

    Serving's candidates are thousands of rows over one catalog: their ids, authors and
    topics are codes into tables like this one, so hashing and matching look at each
    distinct value once per table, not once per candidate and request. ``values`` may be a
    numpy unicode array (it crosses processes as one buffer) or any sequence.
    """

    def __init__(self, values: Sequence[Any] | np.ndarray):
        if isinstance(values, np.ndarray):
            self.values = values
        else:
            self.values = np.empty(len(values), dtype=object)
            self.values[:] = list(values)
        self._hashes: dict[int, np.ndarray] = {}
        self._index: dict[Any, int] | None = None

    def __len__(self) -> int:
        return len(self.values)

    def hashed(self, buckets: int, codes: np.ndarray | None = None) -> np.ndarray:
        """``hash_ids(values, buckets)`` (of ``values[codes]`` when given). Each value is
        hashed once per bucket count, when first asked for; concurrent callers may both
        hash a value, writing the same bucket."""
        got = self._hashes.get(buckets)
        if got is None:
            got = self._hashes.setdefault(buckets, np.full(len(self.values), -1, np.int64))
        out = got if codes is None else got[codes]
        if (out < 0).any():
            todo = np.flatnonzero(got < 0) if codes is None else np.unique(codes[out < 0])
            got[todo] = hash_ids(self.values[todo].tolist(), buckets)
            out = got if codes is None else got[codes]
        return out

    def codes_of(self, values: Sequence[Any]) -> np.ndarray:
        """The code of each of ``values`` (-1 for a value not in the table)."""
        if self._index is None:
            self._index = dict(zip(self.values.tolist(), range(len(self.values))))
        return np.fromiter(map(self._index.get, values, repeat(-1, len(values))),
                           dtype=np.int64, count=len(values))


@dataclass(frozen=True)
class CodedColumn:
    """A column whose row ``i`` is ``table.values[codes[i]]``; it reads as that sequence."""

    codes: np.ndarray
    table: CodeTable

    @classmethod
    def repeat(cls, value: Any, n: int) -> CodedColumn:
        """``value`` on each of ``n`` rows."""
        return cls(np.zeros(n, dtype=np.int64), CodeTable([value]))

    def __len__(self) -> int:
        return len(self.codes)

    def __getitem__(self, i: int) -> Any:
        return self.table.values[self.codes[i]]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.values().tolist())

    def values(self) -> np.ndarray:
        """The rows' values (an array of the table's dtype)."""
        return self.table.values[self.codes]

    def take(self, rows: np.ndarray) -> CodedColumn:
        """The column of ``rows`` only (same table)."""
        return CodedColumn(self.codes[rows], self.table)

    def hashed(self, buckets: int) -> np.ndarray:
        """``hash_ids(list(self), buckets)`` as a gather from the table's buckets."""
        return self.table.hashed(buckets, self.codes)


def hash_ids(ids: Sequence[Any], buckets: int) -> np.ndarray:
    """Hash ids into ``[1, buckets)``; ``None``/empty ids map to 0 (the padding bucket).

    The hash is ``1 + crc32(utf-8 str(id)) % (buckets - 1)``: stable across processes,
    identical in training and serving.

    Raises:
        FeatureSchemaError: ``buckets`` is below 2.
    """
    if isinstance(buckets, bool) or not isinstance(buckets, (int, np.integer)) or buckets < 2:
        raise FeatureSchemaError(f"buckets must be an int >= 2, got {buckets!r}")
    if isinstance(ids, CodedColumn):
        return ids.hashed(int(buckets))
    mod = int(buckets) - 1
    cache = _HASHES.get(mod)
    if cache is None or len(cache) > HASH_CACHE_SIZE:
        cache = _HASHES[mod] = {}
    n = len(ids)
    try:  # serving: every id seen before, one C-level pass of dict lookups
        return np.fromiter(map(cache.__getitem__, ids), dtype=np.int64, count=n)
    except (KeyError, TypeError):  # new ids, or not strings: hashed here
        pass
    out = np.empty(n, dtype=np.int64)
    for k, v in enumerate(ids):
        h = cache.get(v) if isinstance(v, str) else None
        if h is None:
            if v is None or v == "" or (isinstance(v, float) and math.isnan(v)):
                h = 0
            else:
                h = 1 + zlib.crc32(str(v).encode("utf-8")) % mod
            if isinstance(v, str):  # only strings: 1, 1.0 and True are one dict key
                cache[v] = h
        out[k] = h
    return out


#: bucket of each id already hashed, per bucket count (cleared past ``HASH_CACHE_SIZE``):
#: a feed request hashes the same catalog ids every time
_HASHES: dict[int, dict[Any, int]] = {}
HASH_CACHE_SIZE = 1_000_000


@dataclass(frozen=True)
class DenseFeature:
    """One dense input: ``(transform(value or default) - mean) / std``.

    ``log1p`` applies ``sign(x) * log1p(|x|)`` first (for counts and other heavy tails).
    """

    name: str
    log1p: bool = False
    mean: float = 0.0
    std: float = 1.0
    default: float = 0.0


@dataclass(frozen=True)
class CategoricalField:
    """A string id column hashed into ``buckets`` (bucket 0 = missing)."""

    name: str
    buckets: int

    def __post_init__(self) -> None:
        if isinstance(self.buckets, bool) or not isinstance(self.buckets, int) or self.buckets < 2:
            raise FeatureSchemaError(
                f"categorical field {self.name!r}: buckets must be an int >= 2, "
                f"got {self.buckets!r}"
            )


def _as_list(value: Any) -> list[Any]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    if isinstance(value, str):
        return json.loads(value) if value.startswith("[") else value.split()
    return list(value)


def key_counts(keys: Sequence[Any], lists: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Return, per row, how often ``keys[i]`` occurs in ``lists[i]``, and the list's length.

    A list may be a Python list, a JSON array string (as backfilled) or None (empty). Rows
    holding the same list object (one user's list broadcast to every candidate) are counted
    once.
    """
    n = len(keys)
    # serving: one user's list for every row (list.count compares in C, identity first)
    if n and isinstance(lists, list) and lists.count(lists[0]) == n:
        items = _as_list(lists[0])
        counts = Counter(items)
        if isinstance(keys, CodedColumn):  # each distinct key counted once, then gathered
            table = keys.table.values
            if len(table) <= 4 * n:  # a small table (topics): count every value of it
                per_code = np.fromiter(map(counts.get, table.tolist(), repeat(0, len(table))),
                                       dtype=np.float64, count=len(table))
                return per_code[keys.codes], np.full(n, float(len(items)))
            used, inverse = np.unique(keys.codes, return_inverse=True)
            per_code = np.fromiter(map(counts.get, table[used].tolist(), repeat(0, len(used))),
                                   dtype=np.float64, count=len(used))
            return per_code[inverse.reshape(-1)], np.full(n, float(len(items)))
        per_key = {k: counts.get(k, 0) for k in set(keys)}
        count = np.fromiter(map(per_key.__getitem__, keys), dtype=np.float64, count=n)
        return count, np.full(n, float(len(items)))
    count = np.zeros(n, dtype=np.float64)
    length = np.zeros(n, dtype=np.float64)
    counted: dict[int, tuple[Counter, int]] = {}
    for i in range(n):
        v = lists[i]
        hit = counted.get(id(v))
        if hit is None:
            items = _as_list(v)
            hit = (Counter(items), len(items))
            counted[id(v)] = hit
        counts, total = hit
        count[i] = counts.get(keys[i], 0)
        length[i] = total
    return count, length


def key_share(keys: Sequence[Any], lists: Sequence[Any]) -> np.ndarray:
    """Return, per row, the share of ``lists[i]`` equal to ``keys[i]`` (0 for an empty list)."""
    count, length = key_counts(keys, lists)
    return np.divide(count, length, out=np.zeros_like(count), where=length > 0)


def _column(batch: Batch, name: str, n: int) -> Sequence[Any]:
    col = batch.get(name)
    return [None] * n if col is None else col


@dataclass(frozen=True)
class KeyShare:
    """A user x candidate cross feature: the share of a list feature's values equal to a key.

    ``KeyShare("topic_share_engaged_7d", key="topic", values="user_engaged_topics_7d")`` is,
    per candidate row, the fraction of the user's recently engaged topics that are the
    candidate's topic (0 when the list is empty or missing).
    """

    name: str
    key: str
    values: str
    kind: ClassVar[str] = "share"

    @property
    def lists(self) -> tuple[str, ...]:
        """The list features this cross reads."""
        return (self.values,)

    def compute(self, batch: Batch, n: int) -> np.ndarray:
        """The feature for every row of ``batch`` (which holds ``key`` and the list)."""
        return key_share(batch[self.key], _column(batch, self.values, n))


@dataclass(frozen=True)
class KeyRate:
    """A smoothed per-key rate between two list features of one user.

    ``(count of key in hits + prior_hits) / (count of key in trials + prior_trials)``: with
    ``hits`` the topics of the user's long views and ``trials`` the topics of all their
    views, it is how often the user dwells on the candidate's topic once shown it, which
    removes the exposure bias a plain share has (popular topics are viewed by everyone).
    """

    name: str
    key: str
    hits: str
    trials: str
    prior_hits: float = 0.5
    prior_trials: float = 5.0
    kind: ClassVar[str] = "rate"

    @property
    def lists(self) -> tuple[str, ...]:
        """The list features this cross reads."""
        return (self.hits, self.trials)

    def compute(self, batch: Batch, n: int) -> np.ndarray:
        """The feature for every row of ``batch`` (which holds ``key`` and both lists)."""
        keys = batch[self.key]
        hits, _ = key_counts(keys, _column(batch, self.hits, n))
        trials, _ = key_counts(keys, _column(batch, self.trials, n))
        return (hits + self.prior_hits) / (trials + self.prior_trials)


CrossFeature = KeyShare | KeyRate
"""A dense input computed from a candidate key and the user's list features, identically in
training (backfilled list columns) and serving (hydrated lists)."""

_CROSS_KINDS: dict[str, type] = {"share": KeyShare, "rate": KeyRate}


def cross_to_dict(cross: CrossFeature) -> dict[str, Any]:
    """A JSON-ready dict of a cross feature, with its ``kind``."""
    return {"kind": cross.kind, **asdict(cross)}


def cross_from_dict(data: Mapping[str, Any]) -> CrossFeature:
    """Rebuild a cross feature from :func:`cross_to_dict` output.

    Raises:
        FeatureSchemaError: unknown kind or fields.
    """
    fields = dict(data)
    kind = fields.pop("kind", None)
    cls = _CROSS_KINDS.get(kind)
    if cls is None:
        raise FeatureSchemaError(
            f"unknown cross feature kind {kind!r}; expected one of {sorted(_CROSS_KINDS)}")
    try:
        return cls(**fields)
    except TypeError as exc:
        raise FeatureSchemaError(f"malformed {kind} cross feature {data!r}: {exc}") from exc


@dataclass(frozen=True)
class FeatureSchema:
    """How rows become model inputs; serialized to JSON in the model manifest.

    Args:
        dense: dense features in input-column order.
        categorical: hashed id fields in input-column order.
        sequence: name of the field holding the user's recent item ids (a list per row),
            or None for a model without a sequence.
        sequence_length: ids kept per row (the most recent first), padded with 0.
        sequence_buckets: buckets of the sequence ids (the item-id buckets, so a model
            may share the item embedding).
        crosses: cross features among ``dense`` that :func:`dense_matrix` computes from a
            key column and the user's list columns when the rows do not carry them
            (:class:`KeyShare`, :class:`KeyRate`).
    """

    dense: tuple[DenseFeature, ...] = ()
    categorical: tuple[CategoricalField, ...] = ()
    sequence: str | None = None
    sequence_length: int = 0
    sequence_buckets: int = 2
    extra: Mapping[str, Any] = field(default_factory=dict)
    crosses: tuple[CrossFeature, ...] = ()

    def __post_init__(self) -> None:
        names = [d.name for d in self.dense] + [c.name for c in self.categorical]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FeatureSchemaError(f"feature names appear twice in the schema: {dup}")
        if self.sequence is not None and self.sequence_length < 1:
            raise FeatureSchemaError(
                f"sequence {self.sequence!r} needs sequence_length >= 1, "
                f"got {self.sequence_length!r}"
            )
        if self.sequence_buckets < 2:
            raise FeatureSchemaError(
                f"sequence_buckets must be >= 2, got {self.sequence_buckets!r}"
            )

    @property
    def dense_names(self) -> list[str]:
        """Dense feature names in input order."""
        return [d.name for d in self.dense]

    @property
    def categorical_names(self) -> list[str]:
        """Categorical field names in input order."""
        return [c.name for c in self.categorical]

    @property
    def feature_names(self) -> list[str]:
        """Every input name: dense, then categorical, then the sequence field."""
        seq = [self.sequence] if self.sequence else []
        return [*self.dense_names, *self.categorical_names, *seq]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready dict (with a ``format`` number)."""
        d = asdict(self)
        d["extra"] = dict(self.extra)
        d["crosses"] = [cross_to_dict(k) for k in self.crosses]
        d["format"] = SCHEMA_FORMAT
        return d

    def to_json(self) -> str:
        """Return the schema as a JSON string (sorted keys)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> FeatureSchema:
        """Rebuild a schema from :meth:`to_dict` output.

        Raises:
            FeatureSchemaError: the dict is not a schema of a known format.
        """
        fmt = data.get("format", SCHEMA_FORMAT)
        if fmt != SCHEMA_FORMAT:
            raise FeatureSchemaError(
                f"feature schema format {fmt!r} is not supported (expected {SCHEMA_FORMAT}); "
                "retrain the model with this version of Tessera"
            )
        try:
            return cls(
                dense=tuple(DenseFeature(**d) for d in data.get("dense", ())),
                categorical=tuple(CategoricalField(**c) for c in data.get("categorical", ())),
                sequence=data.get("sequence"),
                sequence_length=int(data.get("sequence_length", 0)),
                sequence_buckets=int(data.get("sequence_buckets", 2)),
                extra=dict(data.get("extra", {})),
                crosses=tuple(cross_from_dict(k) for k in data.get("crosses", ())),
            )
        except TypeError as exc:
            raise FeatureSchemaError(f"malformed feature schema: {exc}") from exc

    @classmethod
    def from_json(cls, text: str | bytes) -> FeatureSchema:
        """Parse :meth:`to_json` output."""
        return cls.from_dict(json.loads(text))


class DenseStats:
    """Streaming mean/std of dense features (after ``log1p`` where asked), for fitting.

    Call :meth:`update` on every training batch, then :meth:`features`.
    """

    def __init__(self, names: Sequence[str], log1p: Sequence[str] = (),
                 defaults: Mapping[str, float] | None = None,
                 crosses: Sequence[CrossFeature] = ()):
        self.names = list(names)
        self.crosses = tuple(crosses)
        self.log1p = set(log1p)
        self.defaults = dict(defaults or {})
        self.n = 0
        self.sum = np.zeros(len(self.names))
        self.sumsq = np.zeros(len(self.names))

    def _raw(self) -> tuple[DenseFeature, ...]:
        return tuple(DenseFeature(n, n in self.log1p, 0.0, 1.0, self.defaults.get(n, 0.0))
                     for n in self.names)

    def update(self, batch: Batch) -> None:
        """Fold one batch of rows in."""
        raw = FeatureSchema(dense=self._raw(), crosses=self.crosses)
        x = dense_matrix(batch, raw).astype(np.float64)
        self.n += len(x)
        self.sum += x.sum(axis=0)
        self.sumsq += (x * x).sum(axis=0)

    def features(self) -> tuple[DenseFeature, ...]:
        """Return the fitted features (std floored at 1e-6; mean 0, std 1 when no rows)."""
        if self.n == 0:
            return self._raw()
        mean = self.sum / self.n
        var = np.maximum(self.sumsq / self.n - mean * mean, 0.0)
        std = np.maximum(np.sqrt(var), 1e-6)
        return tuple(
            DenseFeature(n, n in self.log1p, float(m), float(s), self.defaults.get(n, 0.0))
            for n, m, s in zip(self.names, mean, std)
        )


def columnar(rows: Sequence[Mapping[str, Any]] | Batch) -> Batch:
    """Return ``rows`` as a :data:`Batch` (row dicts are transposed; a batch is returned)."""
    if isinstance(rows, Mapping):
        return rows
    keys: dict[str, None] = {}
    for r in rows:
        keys.update(dict.fromkeys(r))
    return {k: [r.get(k) for r in rows] for k in keys}


def _length(batch: Batch) -> int:
    for v in batch.values():
        return len(v)
    return 0


def dense_matrix(rows: Sequence[Mapping[str, Any]] | Batch, schema: FeatureSchema) -> np.ndarray:
    """Return the standardized dense inputs, float32 ``[n, len(schema.dense)]``.

    A missing column or value (None, NaN) takes the feature's ``default``. A
    cross feature (:class:`KeyShare`, :class:`KeyRate`) the rows lack is computed from its
    key and list columns.
    """
    batch = columnar(rows)
    n = _length(batch)
    dense = schema.dense
    x = np.empty((n, len(dense)), dtype=np.float64)
    crosses = {k.name: k for k in schema.crosses}
    for j, f in enumerate(dense):
        col = batch.get(f.name)
        cross = crosses.get(f.name)
        if col is None and cross is not None and cross.key in batch:
            col = cross.compute(batch, n)
        x[:, j] = f.default if col is None else np.asarray(col, dtype=np.float64)  # None: NaN
    # the transforms once over the whole matrix (elementwise: the same values per column)
    defaults = np.array([f.default for f in dense], dtype=np.float64)
    x = np.where(np.isfinite(x), x, defaults)
    logged = np.array([f.log1p for f in dense], dtype=bool)
    if logged.any():
        x[:, logged] = np.sign(x[:, logged]) * np.log1p(np.abs(x[:, logged]))
    mean = np.array([f.mean for f in dense], dtype=np.float64)
    std = np.array([f.std for f in dense], dtype=np.float64)
    return ((x - mean) / std).astype(np.float32)


def categorical_matrix(rows: Sequence[Mapping[str, Any]] | Batch,
                       schema: FeatureSchema) -> np.ndarray:
    """Return the hashed categorical inputs, int64 ``[n, len(schema.categorical)]``."""
    batch = columnar(rows)
    n = _length(batch)
    out = np.zeros((n, len(schema.categorical)), dtype=np.int64)
    for j, c in enumerate(schema.categorical):
        col = batch.get(c.name)
        if col is not None:
            out[:, j] = hash_ids(col if isinstance(col, CodedColumn) else list(col), c.buckets)
    return out


def sequence_matrix(rows: Sequence[Mapping[str, Any]] | Batch,
                    schema: FeatureSchema) -> np.ndarray:
    """Return the hashed sequence ids, int64 ``[n, sequence_length]``, 0-padded on the right.

    A row's sequence is a list of item ids, most recent first (a ``last_n`` value); a JSON
    string of such a list is accepted too. Ids beyond ``sequence_length`` are dropped.
    """
    batch = columnar(rows)
    n = _length(batch)
    length = schema.sequence_length
    out = np.zeros((n, max(length, 0)), dtype=np.int64)
    if schema.sequence is None or length == 0:
        return out
    col = batch.get(schema.sequence)
    if col is None:
        return out
    flat: list[Any] = []
    where: list[tuple[int, int]] = []
    for i, seq in enumerate(col):
        if seq is None or (isinstance(seq, float) and math.isnan(seq)):
            continue
        if isinstance(seq, str):
            seq = json.loads(seq) if seq.startswith("[") else seq.split()
        for k, v in enumerate(list(seq)[:length]):
            flat.append(v)
            where.append((i, k))
    if flat:
        hashed = hash_ids(flat, schema.sequence_buckets)
        idx = np.asarray(where, dtype=np.int64)
        out[idx[:, 0], idx[:, 1]] = hashed
    return out


def select_dense(schema: FeatureSchema, names: Sequence[str]) -> FeatureSchema:
    """Return a schema with only the dense features ``names`` (in that order), no ids or sequence.

    Raises:
        FeatureSchemaError: a name is not a dense feature of ``schema``.
    """
    by_name = {d.name: d for d in schema.dense}
    missing = [n for n in names if n not in by_name]
    if missing:
        raise FeatureSchemaError(
            f"dense feature(s) {missing} are not in the schema; it has {sorted(by_name)}"
        )
    return FeatureSchema(dense=tuple(by_name[n] for n in names))
