"""Embedded online store on LMDB: one environment directory, one writer, many reader processes.

Sub-databases and keys (utf8, NUL-separated):

=============  ====================================  ==========================================
sub-database   key                                   value
=============  ====================================  ==========================================
``blocks``     ``entity_type\\0family\\0entity_id``    ``BlockTable.encode()`` (``TBT1``)
``sequences``  ``entity_type\\0entity_id``             ``records.encode_sequence`` (``TSQ1``)
``values``     ``entity_type\\0table\\0entity_id``     ``records.encode_value`` (``TVR1``)
``watermarks`` watermark name                        int64 little endian
``meta``       user key; ``\\0``-prefixed keys are     bytes
               reserved (value column lists)
=============  ====================================  ==========================================

Every write method runs in one write transaction; LMDB serializes writers across processes
and readers never block. Readers open the same directory with ``readonly=True``.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lmdb

from features.store.base import (
    ActionSequence,
    BlockBatchWrite,
    BlockRow,
    OnlineStore,
    SequenceRow,
    ValueRow,
    ValuesResult,
    check_part,
    merge_sequence,
)
from features.store.blockbatch import BlockBatch, merge_records
from features.store.blocktable import BlockTable
from features.store.errors import StoreError, StoreUnavailableError
from features.store.records import (
    columns_id,
    decode_sequence,
    decode_values,
    encode_sequence,
    encode_value,
)

DEFAULT_MAP_SIZE = 64 << 30
"""Sparse upper bound of the data file (64 GiB); only written pages use disk."""

_DBS = (b"blocks", b"sequences", b"values", b"watermarks", b"meta")
_I64 = struct.Struct("<q")
_RETENTION_CHUNK = 10_000


@dataclass
class _Shared:
    """One open environment of this process (LMDB forbids opening a path twice per process)."""

    env: lmdb.Environment
    dbs: dict
    readonly: bool
    refs: int = 0


# Process-wide by necessity: LMDB itself allows one environment per path per process, so
# stores opened on the same path in one process share it (a reader may reuse the writer's).
_OPEN: dict[str, _Shared] = {}
_OPEN_LOCK = threading.Lock()
# A forked child must not use its parent's environments; it opens its own.
os.register_at_fork(after_in_child=_OPEN.clear)


class LmdbStore(OnlineStore):
    """The embedded ``OnlineStore``; see the module docstring for the layout.

    Args:
        path: environment directory (created by a writer if missing).
        readonly: open for reading only; the directory must have been opened by a writer.
        map_size: maximum size of the data file in bytes (sparse).
        sync: every write is on disk when it returns (a write of many transactions syncs
            once, at its end). ``False`` trades the last writes on power loss for write
            speed; a process crash never corrupts the store either way.
        max_readers: reader slots shared by all processes.

    Raises:
        StoreUnavailableError: the directory cannot be opened (missing for a reader, locked,
            not an LMDB environment).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
        max_readers: int = 1024,
    ):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not (self.path / "data.mdb").exists():
            raise StoreUnavailableError(
                f"no LMDB store at {str(self.path)!r}: open it once without readonly=True "
                "(the writer creates it) before opening readers"
            )
        self._env: lmdb.Environment | None = None
        self._sync = sync and not readonly
        self._real = os.path.realpath(self.path)
        with _OPEN_LOCK:
            shared = _OPEN.get(self._real)
            if shared is None:
                shared = _Shared(*self._open_env(readonly, map_size, sync, max_readers), readonly)
                _OPEN[self._real] = shared
            elif shared.readonly and not readonly:
                raise StoreError(
                    f"LMDB store at {str(self.path)!r} is already open readonly in this process; "
                    "LMDB allows one environment per process: open the writable store first "
                    "(readers in the same process then share it)"
                )
            shared.refs += 1
        self._env, dbs = shared.env, shared.dbs
        self._blocks = dbs[b"blocks"]
        self._sequences = dbs[b"sequences"]
        self._values = dbs[b"values"]
        self._watermarks = dbs[b"watermarks"]
        self._meta = dbs[b"meta"]

    def _open_env(self, readonly: bool, map_size: int, sync: bool, max_readers: int):
        try:
            if not readonly:
                self.path.mkdir(parents=True, exist_ok=True)
            env = lmdb.open(
                str(self.path),
                map_size=map_size,
                subdir=True,
                readonly=readonly,
                lock=True,
                max_dbs=len(_DBS) + 1,
                max_readers=max_readers,
                sync=sync,
                # the meta page is flushed by ``_commit`` once a write is whole (a write of
                # many transactions syncs once, not twice a transaction); a crash of the
                # system can only undo the last commit, never corrupt the store
                metasync=False,
                readahead=False,
                create=not readonly,
            )
        except (lmdb.Error, OSError) as exc:
            raise StoreUnavailableError(
                f"cannot open LMDB store at {str(self.path)!r}: {exc}"
            ) from exc
        try:
            if not readonly:
                env.reader_check()  # free the slots of crashed reader processes
            dbs = {name: env.open_db(name, create=not readonly) for name in _DBS}
        except lmdb.NotFoundError as exc:
            env.close()
            raise StoreUnavailableError(
                f"LMDB store at {str(self.path)!r} is not initialized: open it once without "
                "readonly=True before opening readers"
            ) from exc
        except lmdb.Error as exc:
            env.close()
            raise StoreUnavailableError(
                f"cannot open LMDB store at {str(self.path)!r}: {exc}"
            ) from exc
        return env, dbs

    def __repr__(self) -> str:
        return f"LmdbStore({str(self.path)!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ plumbing

    @property
    def env(self) -> lmdb.Environment:
        if self._env is None:
            raise StoreError(f"{self!r} is closed")
        return self._env

    def _flush_to_disk(self) -> None:
        """Sync the data file, meta page included (``metasync`` is off: see ``_open_env``)."""
        self.env.sync(True)

    def _write(self, operation: str, db=None) -> lmdb.Transaction:
        self._check_writable(operation)
        return self.env.begin(write=True, db=db)

    def _commit(self, operation: str, fn, durable: bool = True) -> object:
        """Run ``fn(txn)`` in one write transaction, translating LMDB errors.

        ``durable`` (with ``sync``): the commit, and every one before it, is on disk when
        this returns. A write of several transactions passes it on the last one only.
        """
        try:
            with self._write(operation) as txn:
                result = fn(txn)
            if durable and self._sync:
                self._flush_to_disk()
            return result
        except lmdb.MapFullError as exc:
            raise StoreError(
                f"{operation}: the LMDB store at {str(self.path)!r} is full; reopen it with a "
                "larger map_size (lmdb://path?map_size=...)"
            ) from exc
        except lmdb.BadValsizeError as exc:
            raise StoreError(
                f"{operation}: a key is longer than LMDB's limit of {self.env.max_key_size()} "
                "bytes; use shorter entity ids, families or table names"
            ) from exc

    @staticmethod
    def _key(*parts: str) -> bytes:
        return "\x00".join(parts).encode("utf-8")

    def _scan(
        self, txn, db, prefix: bytes, start: bytes | None = None
    ) -> Iterator[tuple[bytes, bytes]]:
        cur = txn.cursor(db=db)
        if not cur.set_range(start or prefix):
            return
        for key, value in cur:
            if not key.startswith(prefix):
                return
            yield key, value

    # ------------------------------------------------------------------ blocks

    def put_blocks(
        self,
        entity_type: str,
        family: str,
        rows: Sequence[BlockRow],
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        head = f"{check_part('entity_type', entity_type)}\x00{check_part('family', family)}\x00"
        by_entity: dict[str, list[tuple[str, int, int, bytes]]] = defaultdict(list)
        for entity_id, feature_key, start, size, rep in rows:
            by_entity[entity_id].append((feature_key, start, size, rep))
        if not by_entity:
            self._check_writable("put_blocks")
            return
        # Build every new record before the transaction so the writer lock is held briefly
        # only for the reads and puts.
        keys = [(head + check_part("entity_id", e)).encode("utf-8") for e in by_entity]
        written = {row[1] for row in rows}

        def run(txn):
            get, put = txn.get, txn.put
            for key, new_rows in zip(keys, by_entity.values()):
                old = get(key, db=self._blocks)
                table = BlockTable.decode(old) if old is not None else BlockTable.empty()
                table = table.upsert(new_rows)
                if keep_after:
                    table = table.drop_expired(keep_after, written)
                put(key, table.encode(), db=self._blocks)

        self._commit("put_blocks", run)

    def put_block_batch(
        self,
        entity_type: str,
        family: str,
        batch: BlockBatch,
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        if not len(batch):
            self._check_writable("put_block_batch")
            return
        write = BlockBatchWrite(entity_type, family, batch, keep_after)
        self._commit("put_block_batch", lambda txn: self._merge_batch(txn, write))

    #: entities merged per write transaction by ``put_block_batches`` (LMDB holds a
    #: transaction's dirty pages in memory until it commits)
    TXN_ENTITIES = 25_000

    def put_block_batches(
        self,
        writes: Iterable[BlockBatchWrite],
        watermarks: Mapping[str, int] | None = None,
    ) -> None:
        self._check_writable("put_block_batches")
        # Consumed as it goes: a write made chunk by chunk (the blocks sink's) holds one
        # chunk's copy of its rows at a time, not a copy of the whole flush.
        pending = (w for w in writes if len(w.batch))
        nxt = next(pending, None)
        if nxt is None and not watermarks:
            return
        while True:
            def run(txn):
                nonlocal nxt
                entities = 0
                while nxt is not None and (not entities or entities + len(
                        nxt.batch.entity_ids) <= self.TXN_ENTITIES):
                    entities += len(nxt.batch.entity_ids)
                    self._merge_batch(txn, nxt)
                    nxt = next(pending, None)
                if nxt is None and watermarks:  # in the last transaction
                    self._raise_watermarks(txn, watermarks)

            self._commit("put_block_batches", run, durable=False)
            if nxt is None:
                if self._sync:
                    self._flush_to_disk()  # the whole write durable: one sync
                return

    def _merge_batch(self, txn, write: BlockBatchWrite) -> None:
        """Merge one batch into its records within ``txn`` (keys read and written in order)."""
        head = (f"{check_part('entity_type', write.entity_type)}\x00"
                f"{check_part('family', write.family)}\x00")
        keys = _entity_keys(head, write.batch.entity_ids)
        get = txn.get
        old = [get(k, db=self._blocks) for k in keys]
        new = merge_records(old, write.batch, write.keep_after)
        txn.cursor(db=self._blocks).putmulti(
            [(k, rec) for k, rec in zip(keys, new) if rec is not None])
        for key, rec, before in zip(keys, new, old):
            if rec is None and before is not None:
                txn.delete(key, db=self._blocks)

    def get_block_tables(
        self, entity_type: str, family: str, entity_ids: Sequence[str]
    ) -> list[BlockTable | None]:
        head = f"{entity_type}\x00{family}\x00"
        keys = [(head + e).encode("utf-8") for e in entity_ids]
        with self.env.begin(db=self._blocks) as txn:
            get = txn.get
            raws = [get(k) for k in keys]
        decode = BlockTable.decode
        return [None if r is None else decode(r) for r in raws]

    def list_entity_ids(self, entity_type: str, family: str) -> Iterator[str]:
        prefix = f"{entity_type}\x00{family}\x00".encode()
        with self.env.begin(db=self._blocks) as txn:
            cur = txn.cursor()
            if not cur.set_range(prefix):
                return
            for key in cur.iternext(keys=True, values=False):
                if not key.startswith(prefix):
                    return
                yield key[len(prefix):].decode("utf-8")

    def delete_blocks_before(self, entity_type: str, family: str, ts: int) -> int:
        prefix = self._key(check_part("entity_type", entity_type), check_part("family", family), "")
        dropped = 0
        resume: bytes | None = None

        def run(txn) -> bytes | None:
            # Bounded chunks: a retention pass over millions of records never holds the
            # writer lock (or one huge dirty transaction) for long.
            nonlocal dropped
            changes: list[tuple[bytes, bytes | None]] = []
            next_key = None
            for n, (key, raw) in enumerate(self._scan(txn, self._blocks, prefix, resume)):
                if n >= _RETENTION_CHUNK:
                    next_key = key
                    break
                table = BlockTable.decode(raw)
                kept = table.drop_before(ts)
                if len(kept) != len(table):
                    dropped += len(table) - len(kept)
                    changes.append((key, kept.encode() if len(kept) else None))
            for key, value in changes:
                if value is None:
                    txn.delete(key, db=self._blocks)
                else:
                    txn.put(key, value, db=self._blocks)
            return next_key

        while True:
            resume = self._commit("delete_blocks_before", run)
            if resume is None:
                return dropped

    # ------------------------------------------------------------------ sequences

    def append_sequence(self, entity_type: str, rows: Sequence[SequenceRow], max_len: int) -> None:
        check_part("entity_type", entity_type)
        by_entity: dict[str, list[SequenceRow]] = defaultdict(list)
        for row in rows:
            by_entity[row[0]].append(row)

        def run(txn):
            for entity_id, new_rows in by_entity.items():
                key = self._key(entity_type, check_part("entity_id", entity_id))
                old = txn.get(key, db=self._sequences)
                current = decode_sequence(old) if old is not None else ActionSequence.empty()
                merged = merge_sequence(current, new_rows, max_len)
                txn.put(key, encode_sequence(merged), db=self._sequences)

        if max_len <= 0:
            raise StoreError(f"max_len must be a positive int, got {max_len!r}")
        self._commit("append_sequence", run)

    def get_sequences(
        self, entity_type: str, entity_ids: Sequence[str], max_len: int | None = None
    ) -> list[ActionSequence]:
        with self.env.begin(db=self._sequences) as txn:
            raws = [txn.get(self._key(entity_type, e)) for e in entity_ids]
        return [
            ActionSequence.empty() if r is None else decode_sequence(r).head(max_len) for r in raws
        ]

    # ------------------------------------------------------------------ values

    def _columns_key(self, entity_type: str, table: str, cid: int | None = None) -> bytes:
        parts = ["", "values", entity_type, table] + ([f"{cid:08x}"] if cid is not None else [])
        return self._key(*parts)

    def put_values(
        self, entity_type: str, table: str, rows: Sequence[ValueRow], columns: Sequence[str]
    ) -> None:
        check_part("entity_type", entity_type)
        check_part("table", table)
        cols = [str(c) for c in columns]
        if len(set(cols)) != len(cols):
            raise StoreError(f"put_values: column names must be unique, got {cols!r}")
        cid = columns_id(cols)
        payload = [
            (
                self._key(entity_type, table, check_part("entity_id", e)),
                encode_value(v, wm, cid, len(cols)),
            )
            for e, v, wm in rows
        ]
        cols_json = json.dumps(cols).encode("utf-8")

        def run(txn):
            txn.put(self._columns_key(entity_type, table), cols_json, db=self._meta)
            txn.put(self._columns_key(entity_type, table, cid), cols_json, db=self._meta)
            for key, value in payload:
                txn.put(key, value, db=self._values)

        self._commit("put_values", run)

    def get_values(self, entity_type: str, table: str, entity_ids: Sequence[str]) -> ValuesResult:
        with self.env.begin() as txn:
            current_raw = txn.get(self._columns_key(entity_type, table), db=self._meta)
            current = tuple(json.loads(current_raw)) if current_raw is not None else ()
            known = {}
            prefix = self._columns_key(entity_type, table, 0)[:-8]
            for key, raw in self._scan(txn, self._meta, prefix):
                known[int(key[len(prefix) :], 16)] = tuple(json.loads(raw))
            get = txn.get
            head = f"{entity_type}\x00{table}\x00"
            records = [get((head + e).encode("utf-8"), db=self._values) for e in entity_ids]
        return decode_values(records, current, known)

    # ------------------------------------------------------------------ watermarks, meta

    def set_watermark(self, name: str, ts: int) -> int:
        return self.set_watermarks({name: ts})[name]

    def set_watermarks(self, items: Mapping[str, int]) -> dict[str, int]:
        return self._commit("set_watermark", lambda txn: self._raise_watermarks(txn, items))

    def _raise_watermarks(self, txn, items: Mapping[str, int]) -> dict[str, int]:
        encoded = {
            check_part("watermark name", n): (n.encode("utf-8"), int(ts)) for n, ts in items.items()
        }
        out = {}
        for name, (key, ts) in encoded.items():
            old = txn.get(key, db=self._watermarks)
            cur = _I64.unpack(old)[0] if old is not None else None
            if cur is None or ts > cur:
                txn.put(key, _I64.pack(ts), db=self._watermarks)
                cur = ts
            out[name] = cur
        return out

    def get_watermarks(self, prefix: str = "") -> dict[str, int]:
        with self.env.begin(db=self._watermarks) as txn:
            return {
                k.decode("utf-8"): _I64.unpack(v)[0]
                for k, v in self._scan(txn, self._watermarks, prefix.encode("utf-8"))
            }

    def put_meta(self, key: str, value: bytes) -> None:
        check_part("meta key", key)
        self._commit(
            "put_meta", lambda txn: txn.put(key.encode("utf-8"), bytes(value), db=self._meta)
        )

    def get_meta(self, key: str) -> bytes | None:
        with self.env.begin(db=self._meta) as txn:
            return txn.get(key.encode("utf-8"))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._env is None:
            return
        self._env = None
        with _OPEN_LOCK:
            shared = _OPEN[self._real]
            shared.refs -= 1
            if shared.refs == 0:
                del _OPEN[self._real]
                shared.env.close()


def _entity_keys(head: str, entity_ids: Sequence[str]) -> list[bytes]:
    """``head + entity_id`` as UTF-8 of each id; ids must be non-empty str without NUL."""
    try:
        encoded = list(map(str.encode, entity_ids))
    except TypeError:
        encoded = []
    if len(encoded) != len(entity_ids) or (encoded and (
            not min(map(len, encoded)) or b"\x00" in b"".join(encoded))):
        for e in entity_ids:
            check_part("entity_id", e)  # names the first bad id
    return list(map(head.encode("utf-8").__add__, encoded))
