"""The one online-store interface every writer and reader uses, and the types it speaks.

Backends: ``features.store.lmdb_store.LmdbStore`` (embedded default, multi-process) and
``features.store.aerospike_store.AerospikeStore`` (production). Open one with
``features.store.open_store(url)``.

Concurrency contract: one writer process per store (the streaming worker that owns the
partitions), any number of reader processes. Every write method is atomic per call on LMDB
(one write transaction) and atomic per entity record on Aerospike.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from features.store.blockbatch import BlockBatch
from features.store.blocktable import BlockTable
from features.store.errors import ReadOnlyStoreError, StoreError

BlockRow = tuple[str, str, int, int, bytes]
"""``(entity_id, feature_key, start_ms, size_ms, rep)``: the full rep of one block."""

SequenceRow = tuple[str, int, str, str, int, str]
"""``(entity_id, ts_ms, item_id, action, dwell_ms, event_id)``: one action of an entity."""

ValueRow = tuple[str, np.ndarray, int]
"""``(entity_id, float32 values in column order, watermark_ms)``: pre-assembled values."""

NO_WATERMARK = -1
"""Watermark reported by ``get_values`` for an entity that has no row."""


@dataclass(frozen=True, eq=False)
class ActionSequence:
    """The recent actions of one entity, most recent first (``SEQUENCE_ORDER``: ties by larger
    item id, then larger event id).

    Attributes:
        ts: int64[n], event time (epoch ms).
        item_ids: object[n] of str.
        actions: object[n] of str (``click``, ``like``, ...).
        dwell_ms: int64[n].
        event_ids: object[n] of str, the ids that make appends idempotent.
    """

    ts: np.ndarray
    item_ids: np.ndarray
    actions: np.ndarray
    dwell_ms: np.ndarray
    event_ids: np.ndarray

    @classmethod
    def empty(cls) -> ActionSequence:
        """Return a sequence with no actions."""
        obj = np.empty(0, object)
        return cls(np.zeros(0, np.int64), obj, obj.copy(), np.zeros(0, np.int64), obj.copy())

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def head(self, n: int | None) -> ActionSequence:
        """Return the ``n`` most recent actions (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return ActionSequence(
            self.ts[:n], self.item_ids[:n], self.actions[:n], self.dwell_ms[:n], self.event_ids[:n]
        )

    def to_rows(self, entity_id: str) -> list[SequenceRow]:
        """Return the actions as ``SequenceRow``s, most recent first."""
        return [
            (entity_id, int(t), i, a, int(d), e)
            for t, i, a, d, e in zip(
                self.ts, self.item_ids, self.actions, self.dwell_ms, self.event_ids
            )
        ]


@dataclass(frozen=True, eq=False)
class ValuesResult:
    """Pre-assembled values of many entities (``get_values``).

    Attributes:
        matrix: float32[len(ids), len(columns)], NaN where the entity (or the column) is missing.
        watermarks: int64[len(ids)], the watermark each row was computed at; ``NO_WATERMARK``
            for missing entities.
        columns: the column names of ``matrix``.
    """

    matrix: np.ndarray
    watermarks: np.ndarray
    columns: tuple[str, ...]

    def __iter__(self):
        # Unpacks as ``matrix, watermarks, columns = store.get_values(...)``.
        return iter((self.matrix, self.watermarks, self.columns))


def merge_sequence(
    current: ActionSequence, rows: Sequence[SequenceRow], max_len: int
) -> ActionSequence:
    """Return ``current`` with ``rows`` appended: deduplicated on event id, newest ``max_len``.

    A row whose event id is already present is ignored (crash replay is a no-op). The order
    is ``SEQUENCE_ORDER`` descending, a total order, so the result does not depend on the order
    rows arrive in, and an event trimmed earlier stays trimmed when replayed.
    """
    if max_len <= 0:
        raise StoreError(f"max_len must be a positive int, got {max_len!r}")
    by_event: dict[str, tuple[int, str, str, str, int]] = {}
    for t, i, a, d, e in zip(
        current.ts.tolist(),
        current.item_ids,
        current.actions,
        current.dwell_ms.tolist(),
        current.event_ids,
    ):
        by_event[e] = (t, e, i, a, d)
    for _entity, t, i, a, d, e in rows:
        if e not in by_event:
            by_event[e] = (int(t), str(e), str(i), str(a), int(d))
    items = sorted(by_event.values(), key=_sequence_key, reverse=True)[:max_len]
    return sequence_from_tuples(items)


SEQUENCE_ORDER = ("ts", "item_id", "event_id")
"""Newest first by event time; equal times by item id, then event id (both descending): the
tie order of ``last_n`` blocks (by value), so a ``last_n`` of item ids and a sequence list
the same items. Event ids come last only to make the order total (idempotent appends)."""


def _sequence_key(row: tuple[int, str, str, str, int]) -> tuple[int, str, str]:
    t, e, i, _a, _d = row
    return (t, i, e)


def sequence_from_tuples(items: list[tuple[int, str, str, str, int]]) -> ActionSequence:
    """Build a sequence from ``(ts, event_id, item_id, action, dwell_ms)`` in final order."""
    n = len(items)
    if not n:
        return ActionSequence.empty()
    ts, ev, it, ac, dw = zip(*items)
    return ActionSequence(
        ts=np.fromiter(ts, np.int64, n),
        item_ids=_objects(it),
        actions=_objects(ac),
        dwell_ms=np.fromiter(dw, np.int64, n),
        event_ids=_objects(ev),
    )


def _objects(values) -> np.ndarray:
    out = np.empty(len(values), object)
    out[:] = list(values)
    return out


@dataclass(frozen=True)
class BlockBatchWrite:
    """One ``put_block_batch`` call, for ``OnlineStore.put_block_batches``."""

    entity_type: str
    family: str
    batch: BlockBatch
    keep_after: Mapping[int, int] | None = None


def check_part(what: str, value: str) -> str:
    """Return ``value`` if it can be part of a store key, else raise ``StoreError``."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise StoreError(f"{what} must be a non-empty str without NUL characters, got {value!r}")
    return value


class OnlineStore(abc.ABC):
    """Blocks, sequences, pre-assembled values, watermarks and metadata of the online path.

    Records are keyed by ``(entity_type, entity_id)`` (plus ``family`` for blocks, ``table``
    for values). Entity ids are str; times are int epoch ms. A store opened with
    ``readonly=True`` raises ``ReadOnlyStoreError`` on every write. Stores are context
    managers; ``close()`` is idempotent. A store object must not cross ``fork()``: open it in
    the process that uses it.
    """

    readonly: bool = False

    # ------------------------------------------------------------------ blocks

    @abc.abstractmethod
    def put_blocks(
        self,
        entity_type: str,
        family: str,
        rows: Sequence[BlockRow],
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        """Upsert blocks: each row overwrites the block ``(entity, feature, size, start)``.

        ``keep_after`` ({size: ts}) drops, in the same write, the blocks of each touched record
        whose size is listed and whose end is ``<= ts`` (per-size retention), for the
        features this write carries only: blocks of other features in the record are never
        touched (a replay of one feature leaves every other feature as it was).

        The rep is the block's full current rep (the streaming flow rewrites an open block
        many times); it is never combined with what was stored. Rows of many entities go in
        one call (thousands are expected) and are written in one transaction (LMDB) or one
        batch of per-entity atomic operations (Aerospike).

        Args:
            entity_type: e.g. ``item``.
            family: group of features written together: the source topic name.
            rows: ``(entity_id, feature_key, start_ms, size_ms, rep)``.
        """

    def put_block_batch(
        self,
        entity_type: str,
        family: str,
        batch: BlockBatch,
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        """``put_blocks`` for rows given as columns (the streaming flow's fast path).

        Retention applies to the features in ``batch.feature_keys``.

        Backends override this with a vectorized merge; the default goes through rows.
        """
        self.put_blocks(entity_type, family, batch.to_rows(), keep_after=keep_after)

    #: True where dropping expired blocks in a write costs a server-side operation per
    #: record and retention per block size (Aerospike): the blocks flow then writes without
    #: ``keep_after`` and calls ``drop_expired`` every ``SWEEP_INTERVAL_S`` instead
    sweeps_expired: bool = False

    def drop_expired(self, entity_type: str, family: str, feature_keys: Iterable[str],
                     keep_after: Mapping[int, int], *, wait: bool = True) -> None:
        """Drop from every record of ``family`` the blocks of ``feature_keys`` that
        ``keep_after`` expires (the rule of a write's ``keep_after``; other features' blocks
        are untouched); with ``wait``, return once done, else once started (``sweeping``).
        Only stores with ``sweeps_expired`` have it."""
        raise NotImplementedError(f"{type(self).__name__} drops expired blocks on write")

    def sweeping(self) -> bool:
        """Whether a ``drop_expired`` started without ``wait`` still runs."""
        return False

    def put_block_batches(
        self,
        writes: Iterable[BlockBatchWrite],
        watermarks: Mapping[str, int] | None = None,
    ) -> None:
        """Write many ``put_block_batch`` calls, then raise ``watermarks``.

        The watermarks are raised only after every block they vouch for is written.
        Backends with transactions group the writes into few of them (one fsync each);
        the default writes one by one. ``writes`` is consumed once, in order, and may be a
        generator (each write then exists only while it is written).
        """
        for w in writes:
            self.put_block_batch(w.entity_type, w.family, w.batch, keep_after=w.keep_after)
        if watermarks:
            self.set_watermarks(watermarks)

    @abc.abstractmethod
    def get_block_tables(
        self, entity_type: str, family: str, entity_ids: Sequence[str]
    ) -> list[BlockTable | None]:
        """Return the block table of each id, in the order of ``entity_ids`` (None if missing).

        The hot path: one read per entity, batched, decoded without per-block Python objects.
        """

    def list_entity_ids(self, entity_type: str, family: str) -> Iterator[str]:
        """Yield the id of every entity with a block record in ``family`` (no order promised).

        For batch jobs (pre-assembly, retention), not the request path.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot list entities")

    @abc.abstractmethod
    def delete_blocks_before(self, entity_type: str, family: str, ts: int) -> int:
        """Drop every block whose end is ``<= ts``; return how many were dropped.

        Records left empty are deleted. Backends with a TTL (Aerospike) also expire whole
        records that were not written for the TTL.
        """

    # ------------------------------------------------------------------ sequences

    @abc.abstractmethod
    def append_sequence(self, entity_type: str, rows: Sequence[SequenceRow], max_len: int) -> None:
        """Append actions and keep only the newest ``max_len`` per entity by ``SEQUENCE_ORDER``
        (ts, item id, event id).

        Idempotent on ``event_id``: appending an event id already present is a no-op, and
        so is replaying one that was trimmed out, so a crashed writer may replay freely.
        """

    @abc.abstractmethod
    def get_sequences(
        self, entity_type: str, entity_ids: Sequence[str], max_len: int | None = None
    ) -> list[ActionSequence]:
        """Return each id's actions, most recent first (empty when missing), at most ``max_len``."""

    # ------------------------------------------------------------------ values

    @abc.abstractmethod
    def put_values(
        self, entity_type: str, table: str, rows: Sequence[ValueRow], columns: Sequence[str]
    ) -> None:
        """Write pre-assembled values: each row replaces the entity's row in ``table``.

        ``columns`` names the entries of every row's vector; it may change between calls
        (rows written under an older column list are read back by column name).

        Raises:
            StoreError: a vector's length differs from ``len(columns)``.
        """

    @abc.abstractmethod
    def get_values(self, entity_type: str, table: str, entity_ids: Sequence[str]) -> ValuesResult:
        """Return ``(matrix, watermarks, columns)`` for ``entity_ids`` under the latest columns.

        Missing entities get a NaN row and ``NO_WATERMARK``; a table never written has no
        columns.
        """

    # ------------------------------------------------------------------ watermarks, meta

    @abc.abstractmethod
    def set_watermark(self, name: str, ts: int) -> int:
        """Raise watermark ``name`` to ``ts``; never lower it. Return the stored value."""

    def set_watermarks(self, items: Mapping[str, int]) -> dict[str, int]:
        """Raise many watermarks at once (one transaction where the backend allows)."""
        return {name: self.set_watermark(name, ts) for name, ts in items.items()}

    @abc.abstractmethod
    def get_watermarks(self, prefix: str = "") -> dict[str, int]:
        """Return every watermark whose name starts with ``prefix``."""

    @abc.abstractmethod
    def put_meta(self, key: str, value: bytes) -> None:
        """Store a small metadata value (spec hashes, column lists, versions)."""

    @abc.abstractmethod
    def get_meta(self, key: str) -> bytes | None:
        """Return a metadata value, or None."""

    # ------------------------------------------------------------------ lifecycle

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store; further calls raise ``StoreError``. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_writable(self, operation: str) -> None:
        if self.readonly:
            raise ReadOnlyStoreError(operation)
