"""Production online store on Aerospike (``aerospike`` Python client, server 6.0+).

Data model (namespace from the URL):

* One record per entity: set = entity type, user key = entity id.
* Blocks of a family live in one **KEY_ORDERED map bin** ``family_bin(family)`` =
  ``"b_" + 8 hex of sha1(family)`` (bin names are limited to 15 bytes). The map key is
  ``encode_block_key(feature_key, size, start)`` (bytes that sort as ``(feature, size,
  start)``), the value the rep bytes. ``put_blocks`` is one ``map_put_items`` per entity, all
  entities in one ``batch_write``; reads are ``batch_read`` of that bin, converted to a
  ``BlockTable`` by ``blocktable_from_map``. The bin-name table (bin -> family) lives in the
  meta record ``\\0bins``; a hash collision between two families is refused on first write.
* Sequences: bin ``seq2``, a KEY_ORDERED map ``event_id -> [ts, item_id, event_id, action,
  dwell_ms]``. Chosen over a list bin plus a separate dedup bin: one bin and one ``operate``
  give dedup and trim atomically. ``map_put_items`` with CREATE_ONLY|NO_FAIL|PARTIAL makes a
  replayed event id a no-op; ``map_remove_by_rank_range(-max_len, max_len, inverted=True)``
  keeps the ``max_len`` greatest values, i.e. the newest by ``(ts, item_id, event_id)``,
  which is the total order the LMDB backend uses (``base.SEQUENCE_ORDER``). The bin was
  ``seq`` with ``[ts, event_id, ...]`` values before ties were ordered like ``last_n``
  blocks; such a bin is not read (the sequences worker rebuilds from Kafka).
* Values: bin ``"v_" + 8 hex`` of the table name holding ``records.encode_value`` bytes; the
  column lists live in the meta record ``\\0values\\0<entity_type>\\0<table>``.
* Watermarks: one record (set ``tessera_wm``, key ``tessera:watermarks``) with a map bin
  ``m`` of name -> ts: a read of every watermark is one ``get`` (a feature request reads
  them three times; a set query per read cost milliseconds), and a flush's raises are one
  ``map_put_items`` under a generation check, retried on conflict, so none goes back.
* Meta: set ``tessera_meta``, bin ``v``.

Entity records get a TTL (``ttl_s``, default ``DEFAULT_TTL_S``, or ``ttl_for_specs``) that
every write refreshes; watermarks and meta never expire. ``delete_blocks_before`` scans the
set, which is a batch job, not a request-path call.

Entity types named ``tessera_wm`` or ``tessera_meta`` are reserved.

Errors: every Aerospike failure becomes a ``StoreError`` through ``store_error``; the
codes that mean "unreachable now" (connection, timeout, node gone, a batch that failed as a
whole) become ``StoreUnavailableError``, which serving answers with degraded pages and the
workers' sinks wait out (``dataflows.sinks.write_until_stored``). The client reconnects by
itself once the cluster is back.

Tests: the pure helpers are unit-tested; CI starts a real server (``.ci/run``) for the
contract suite (``TESSERA_AEROSPIKE_HOSTS``), and ``tessera.aerospike_local`` starts servers
of their own for the LMDB parity test, the down/restart and record-too-big tests, and the
``aerospike_restart`` fault scenario.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import numpy as np

from features.store.base import (
    ActionSequence,
    BlockRow,
    OnlineStore,
    SequenceRow,
    ValueRow,
    ValuesResult,
    check_part,
    sequence_from_tuples,
)
from features.store.blockbatch import BlockBatch
from features.store.blocktable import BlockTable
from features.store.errors import StoreError, StoreUnavailableError
from features.store.records import columns_id, decode_values, encode_value
from features.timeutil import DAY

try:  # the client is a dependency, but keep the pure helpers importable without it
    import aerospike
    from aerospike import exception as aerospike_exception
    from aerospike_helpers import expressions
    from aerospike_helpers.batch.records import BatchRecords, Write
    from aerospike_helpers.operations import map_operations, operations
except ImportError:  # pragma: no cover - exercised only where the client is missing
    aerospike = None

MAX_BIN_NAME = 15
DEFAULT_TTL_S = (30 * DAY + 2 * DAY) // 1000
"""Default record TTL: the longest default window (30d) plus slack."""

SEQUENCE_BIN = "seq2"
META_SET = "tessera_meta"
WATERMARK_SET = "tessera_wm"
_BATCH = 4096
_KEY_NOT_FOUND = 2
_BIN_NOT_FOUND = 17  # reported by some servers when a selected bin is absent
_SIGN = 1 << 63


# ---------------------------------------------------------------------- pure helpers


def _hashed_bin(prefix: str, name: str) -> str:
    bin_name = prefix + hashlib.sha1(name.encode("utf-8")).hexdigest()[:8]
    if len(bin_name.encode("utf-8")) > MAX_BIN_NAME:  # pragma: no cover - prefixes are short
        raise StoreError(f"bin name {bin_name!r} is longer than {MAX_BIN_NAME} bytes")
    return bin_name


def family_bin(family: str) -> str:
    """Return the bin holding a family's blocks: ``"b_" + 8 hex of sha1(family)`` (10 bytes)."""
    return _hashed_bin("b_", family)


# Keys of META_SET. Aerospike user keys are C strings to the client: a NUL ends them, so
# every key that once began with one was the same empty key. Internal records and the
# users' meta keys get prefixes that keep them apart.
_INTERNAL = "tessera:"
# Entity records store their user key (the entity id): a scan (``list_entity_ids``, the
# pre-assembly's entity list) returns only the digest of records written without it.
_SEND_KEY = {"key": aerospike.POLICY_KEY_SEND} if aerospike is not None else {}
_BIN_NAMES_KEY = f"{_INTERNAL}bins"
_MARKS_KEY = f"{_INTERNAL}watermarks"
_MARKS_BIN = "m"
_META_PREFIX = "meta:"


def values_bin(table: str) -> str:
    """Return the bin holding a value table's row: ``"v_" + 8 hex of sha1(table)``."""
    return _hashed_bin("v_", table)


def encode_block_key(feature_key: str, size: int, start: int) -> bytes:
    """Return the map key of a block: utf8 feature key, NUL, big-endian size and start.

    The start is stored with its sign bit flipped so that byte order equals numeric order;
    a KEY_ORDERED map then keeps blocks sorted like a ``BlockTable``.
    """
    if "\x00" in feature_key:
        raise StoreError(f"feature key must not contain NUL, got {feature_key!r}")
    return (
        feature_key.encode("utf-8")
        + b"\x00"
        + int(size).to_bytes(8, "big")
        + ((int(start) + _SIGN) % (1 << 64)).to_bytes(8, "big")
    )


def _block_keys(batch: BlockBatch) -> list[bytes]:
    """``encode_block_key`` of every row of ``batch``: the 16 bytes of size and start for
    all rows in one numpy pass, then one concatenation per row."""
    for fk in batch.feature_keys:
        if "\x00" in fk:
            raise StoreError(f"feature key must not contain NUL, got {fk!r}")
    tail = np.empty((len(batch), 2), dtype=">u8")
    tail[:, 0] = batch.sizes.astype(np.uint64)
    tail[:, 1] = (batch.starts.astype(np.int64).view(np.uint64) + np.uint64(_SIGN))
    raw = tail.tobytes()
    heads = [fk.encode("utf-8") + b"\x00" for fk in batch.feature_keys]
    fid = batch.feature_idx.tolist()
    return [heads[f] + raw[16 * i:16 * i + 16] for i, f in enumerate(fid)]


def _retention_ops(bin_name: str, feature_keys: Iterable[str],
                   keep_after: Mapping[int, int] | None) -> list:
    """Per (feature, size), one map range removal of the blocks ``keep_after`` expires
    (those ending at or before ``keep_after[size]``); the same ops for every record."""
    return [map_operations.map_remove_by_key_range(
                bin_name, encode_block_key(fk, size, -(2**62)),
                encode_block_key(fk, size, ts - size + 1), aerospike.MAP_RETURN_NONE)
            for fk in sorted(set(feature_keys)) for size, ts in (keep_after or {}).items()]


def decode_block_key(key: bytes) -> tuple[str, int, int]:
    """Invert ``encode_block_key``: return ``(feature_key, size, start)``."""
    key = bytes(key)
    if len(key) < 18 or key[-17] != 0:
        raise StoreError(f"not a block map key: {key!r}")
    return (
        key[:-17].decode("utf-8"),
        int.from_bytes(key[-16:-8], "big"),
        int.from_bytes(key[-8:], "big") - _SIGN,
    )


def blocktable_from_map(blocks: Mapping[bytes, bytes]) -> BlockTable:
    """Convert a family bin (``{block key: rep}``) into a ``BlockTable``.

    Sizes and starts of all keys are parsed with one ``np.frombuffer``; only the feature
    names are split per key.
    """
    if not blocks:
        return BlockTable.empty()
    keys = [bytes(k) for k in blocks]
    n = len(keys)
    if any(len(k) < 18 or k[-17] != 0 for k in keys):
        raise StoreError("a family bin holds a key that is not a block key")
    tails = np.frombuffer(b"".join(k[-16:] for k in keys), ">u8").reshape(n, 2)
    sizes = tails[:, 0].astype(np.int64)
    starts = (tails[:, 1] ^ np.uint64(_SIGN)).view(np.int64)
    names = [k[:-17].decode("utf-8") for k in keys]
    reps = [bytes(v) for v in blocks.values()]
    # A KEY_ORDERED map comes back sorted by its byte keys, which is the table's own order
    # (feature, size, start): build the table directly. Otherwise sort and deduplicate.
    pos: dict[str, int] = {}
    fi = np.fromiter((pos.setdefault(name, len(pos)) for name in names), np.int32, n)
    features = tuple(pos)
    ordered = list(features) == sorted(features) and bool(np.all(np.diff(fi) >= 0))
    if ordered and n > 1:
        same = fi[1:] == fi[:-1]
        later = (sizes[1:] > sizes[:-1]) | ((sizes[1:] == sizes[:-1]) & (starts[1:] > starts[:-1]))
        ordered = bool(np.all(later | ~same))
    if not ordered or (sizes <= 0).any():
        return BlockTable.from_arrays(names, starts, sizes, reps)
    offsets = np.zeros(n + 1, np.uint32)
    offsets[1:] = np.cumsum(np.fromiter(map(len, reps), np.int64, n))
    return BlockTable(features=features, feature_idx=fi, starts=starts.astype(np.int64),
                      sizes=sizes, offsets=offsets, blob=b"".join(reps))


def blocks_to_drop(blocks: Mapping[bytes, bytes], ts: int) -> list[bytes]:
    """Return the map keys of the blocks whose end is ``<= ts``."""
    keys = [bytes(k) for k in blocks]
    if not keys:
        return []
    tails = np.frombuffer(b"".join(k[-16:] for k in keys), ">u8").reshape(len(keys), 2)
    ends = (tails[:, 1] ^ np.uint64(_SIGN)).view(np.int64) + tails[:, 0].astype(np.int64)
    return [keys[i] for i in np.flatnonzero(ends <= ts).tolist()]


def sequence_items(rows: Iterable[SequenceRow]) -> dict[str, dict[str, list]]:
    """Group sequence rows into ``{entity_id: {event_id: [ts, item, event_id, action, dwell]}}``
    (a value list compares in the sequence order, so the server's rank trim keeps the newest).

    Within one call the first row of an event id wins, as in the LMDB backend.
    """
    out: dict[str, dict[str, list]] = defaultdict(dict)
    for entity_id, ts, item_id, action, dwell_ms, event_id in rows:
        out[entity_id].setdefault(
            str(event_id), [int(ts), str(item_id), str(event_id), str(action), int(dwell_ms)]
        )
    return out


def sequence_from_map(
    entries: Mapping[str, list] | None, max_len: int | None = None
) -> ActionSequence:
    """Convert a ``seq`` bin into an ``ActionSequence``, most recent first."""
    if not entries:
        return ActionSequence.empty()
    items = sorted((tuple(v) for v in entries.values()), reverse=True)
    return sequence_from_tuples([(t, e, i, a, d) for t, i, e, a, d in items]).head(max_len)


#: result codes that mean the cluster cannot be reached now (the client reconnects by itself
#: when it is back): no response (-15), max retries (-12), connection (-10), invalid node (-8),
#: no more connections (-7), async connection (-6), timeout (9), cluster changing (11),
#: device overload (18)
UNAVAILABLE_CODES = frozenset({-15, -12, -10, -8, -7, -6, 9, 11, 18})
RECORD_TOO_BIG = 13


def store_error(operation: str, code: int, detail: str, *, whole_batch: bool = False
                ) -> StoreError:
    """Map an Aerospike result code to the store's error, with a message that names the fix.

    Codes of ``UNAVAILABLE_CODES``, and a batch that failed as a whole (``whole_batch``: no
    record says why; with the node gone the client reports code 1), give
    ``StoreUnavailableError``: callers retry or degrade. Code 13 (record too
    big) names the record size limit. Anything else is a ``StoreError`` with the code.
    """
    if code in UNAVAILABLE_CODES or whole_batch:
        return StoreUnavailableError(
            f"{operation}: Aerospike is unavailable (result code {code}: {detail}); the "
            "client reconnects when the cluster is back; check that the server is up and "
            "that the store URL's hosts are right")
    if code == RECORD_TOO_BIG:
        return StoreError(
            f"{operation}: an entity record is larger than the namespace allows (result code "
            f"13, record too big: {detail}); raise the namespace's max-record-size (1 MiB by "
            "default), or keep fewer blocks per entity (shorter windows or coarser block "
            "sizes) or shorter last_n lists")
    return StoreError(f"{operation}: Aerospike error (result code {code}): {detail}")


def parse_hosts(text: str) -> list[tuple[str, int]]:
    """Parse ``host:3000,host2:3000`` (port defaults to 3000)."""
    hosts = []
    for part in text.split(","):
        host, _, port = part.strip().rpartition(":") if ":" in part else (part.strip(), "", "3000")
        try:
            port_num = int(port)
        except ValueError:
            port_num = -1
        if not host or not 0 < port_num < 65536:
            raise StoreError(f"bad Aerospike host {part!r}: expected host:port, e.g. 10.0.0.1:3000")
        hosts.append((host, port_num))
    return hosts


def ttl_for_specs(specs: Iterable, slack_ms: int = DAY) -> int:
    """Return a record TTL in seconds: longest window + largest block size + ``slack_ms``.

    ``specs`` are ``FeatureSpec``s (anything with ``windows`` and ``block_sizes``).
    """
    longest = 0
    for spec in specs:
        longest = max(longest, max(spec.windows, default=0) + max(spec.block_sizes, default=0))
    if not longest:
        return DEFAULT_TTL_S
    return math.ceil((longest + slack_ms) / 1000)


# ---------------------------------------------------------------------- the store


class AerospikeStore(OnlineStore):
    """The production ``OnlineStore``; see the module docstring for the data model.

    Args:
        hosts: seed nodes ``[(host, port), ...]``.
        namespace: Aerospike namespace.
        readonly: refuse writes.
        ttl_s: TTL of entity records in seconds (default ``DEFAULT_TTL_S``).
        timeout_ms: total time a command may take, retries included (default 1000).
        socket_timeout_ms: idle time on one attempt's socket before it is retried
            (default 0: bounded by ``timeout_ms`` only).
        retries: retries of a failed attempt within ``timeout_ms`` (default 2; every write
            this store makes is idempotent, so writes retry too).
        connect_timeout_ms: time to open the first connection to the seeds (default 1000).
        max_conns: connections per server node the client may open (default 100; each
            serving process and worker has its own client).
        client: an already connected client (tests, shared connections).

    Raises:
        StoreUnavailableError: the cluster cannot be reached.
    """

    def __init__(
        self,
        hosts: Sequence[tuple[str, int]],
        namespace: str,
        *,
        readonly: bool = False,
        ttl_s: int | None = None,
        timeout_ms: int = 1000,
        socket_timeout_ms: int = 0,
        retries: int = 2,
        connect_timeout_ms: int = 1000,
        max_conns: int = 100,
        client=None,
    ):
        if aerospike is None:  # pragma: no cover
            raise StoreUnavailableError(
                "the aerospike client is not installed: pip install aerospike"
            )
        self.namespace = check_part("namespace", namespace)
        self.readonly = readonly
        self.ttl_s = DEFAULT_TTL_S if ttl_s is None else int(ttl_s)
        self._bins: dict[str, str] = {}
        self._sweeps: list[int] = []  # background jobs of drop_expired not seen to end
        if client is None:
            timeouts = {"total_timeout": timeout_ms, "socket_timeout": socket_timeout_ms,
                        "max_retries": retries, "sleep_between_retries": 0}
            config = {
                "hosts": list(hosts),
                "connect_timeout": connect_timeout_ms,
                "max_conns_per_node": max_conns,
                "policies": {
                    "read": timeouts,
                    "write": timeouts,
                    "batch": timeouts,
                    "operate": timeouts,
                },
            }
            try:
                client = aerospike.client(config)
                if not client.is_connected():
                    client.connect()
            except aerospike_exception.AerospikeError as exc:
                raise StoreUnavailableError(
                    f"cannot connect to Aerospike at {hosts!r}: {exc}; check the hosts and that "
                    "the cluster is up"
                ) from exc
        self._client = client

    def __repr__(self) -> str:
        return f"AerospikeStore(namespace={self.namespace!r}, readonly={self.readonly})"

    # ------------------------------------------------------------------ plumbing

    @property
    def client(self):
        if self._client is None:
            raise StoreError(f"{self!r} is closed")
        return self._client

    @contextmanager
    def _errors(self, operation: str) -> Iterator[None]:
        try:
            yield
        except aerospike_exception.AerospikeError as exc:
            raise store_error(operation, exc.code, str(exc)) from exc

    def _entity_write(self) -> dict:
        """Write policy of entity records: the store's TTL, and the user key sent."""
        return {"ttl": self.ttl_s, **_SEND_KEY}

    def _key(self, set_name: str, user_key: str) -> tuple:
        return (self.namespace, set_name, user_key)

    def _batch_write(self, operation: str, writes: list) -> None:
        for lo in range(0, len(writes), _BATCH):
            records = BatchRecords(writes[lo : lo + _BATCH])
            with self._errors(operation):
                self.client.batch_write(records)
            # The client does not raise for a failed batch: the status is on the batch and on
            # each record. With the node gone, records can even say 0 while the batch says 1.
            failed = [br for br in records.batch_records if br.result != 0]
            if records.result != 0 and not failed:
                raise store_error(operation, records.result,
                                  f"the batch of {len(records.batch_records)} writes failed",
                                  whole_batch=True)
            if failed:
                raise store_error(
                    operation, failed[0].result,
                    f"{len(failed)} of {len(records.batch_records)} records failed, first "
                    f"{failed[0].key[:3]!r}")

    def _batch_read(
        self, operation: str, set_name: str, ids: Sequence[str], bins: list[str]
    ) -> list[dict | None]:
        out: list[dict | None] = []
        for lo in range(0, len(ids), _BATCH):
            keys = [self._key(set_name, e) for e in ids[lo : lo + _BATCH]]
            with self._errors(operation):
                result = self.client.batch_read(keys, bins)
            if len(result.batch_records) != len(keys):  # the batch as a whole failed
                raise store_error(operation, result.result,
                                  f"{len(result.batch_records)} of {len(keys)} records came back",
                                  whole_batch=True)
            for br in result.batch_records:
                if br.result == 0 and br.record is not None:
                    out.append(br.record[2] or {})
                elif br.result in (_KEY_NOT_FOUND, _BIN_NOT_FOUND):
                    out.append(None)
                else:
                    raise store_error(operation, br.result, f"reading {br.key[:3]!r} failed")
        return out

    def _family_bin(self, family: str) -> str:
        """Return the family's bin, registering it in the bin-name table on first use."""
        name = self._bins.get(family)
        if name is not None:
            return name
        name = family_bin(family)
        policy = {
            "map_write_flags": aerospike.MAP_WRITE_FLAGS_CREATE_ONLY
            | aerospike.MAP_WRITE_FLAGS_NO_FAIL
        }
        with self._errors("put_blocks"):
            _, _, bins = self.client.operate(
                self._key(META_SET, _BIN_NAMES_KEY),
                [
                    map_operations.map_put("names", name, family, map_policy=policy),
                    map_operations.map_get_by_key("names", name, aerospike.MAP_RETURN_VALUE),
                ],
                policy={"ttl": aerospike.TTL_NEVER_EXPIRE},
            )
        owner = bins.get("names")
        if owner != family:
            raise StoreError(
                f"families {family!r} and {owner!r} hash to the same bin {name!r}; rename one of them"
            )
        self._bins[family] = name
        return name

    # ------------------------------------------------------------------ blocks

    def put_blocks(
        self,
        entity_type: str,
        family: str,
        rows: Sequence[BlockRow],
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        self._check_writable("put_blocks")
        self.put_block_batch(entity_type, family, BlockBatch.from_rows(list(rows)),
                             keep_after=keep_after)

    def put_block_batch(
        self,
        entity_type: str,
        family: str,
        batch: BlockBatch,
        *,
        keep_after: Mapping[int, int] | None = None,
    ) -> None:
        """One ``map_put_items`` per entity, all in one ``batch_write``; map keys built for
        the whole batch at once. Retention: the same range removals for every entity (built
        once), for the features of the batch."""
        self._check_writable("put_block_batch")
        check_part("entity_type", entity_type)
        if not len(batch):
            return
        if (batch.sizes <= 0).any():
            bad = int(batch.sizes[batch.sizes <= 0][0])
            raise StoreError(f"block size must be a positive number of ms, got {bad}")
        bin_name = self._family_bin(check_part("family", family))
        keys = _block_keys(batch)
        off = batch.offsets.tolist()
        blob = bytes(batch.blob)
        reps = [blob[a:b] for a, b in zip(off[:-1], off[1:])]
        order = np.argsort(batch.entity_idx, kind="stable")
        ent_sorted = batch.entity_idx[order]
        bounds = np.searchsorted(ent_sorted, np.arange(len(batch.entity_ids) + 1)).tolist()
        order_list = order.tolist()
        policy = {"map_order": aerospike.MAP_KEY_ORDERED}
        retention = _retention_ops(bin_name, batch.feature_keys, keep_after)
        write_policy = self._entity_write()
        writes = []
        for e, entity_id in enumerate(batch.entity_ids):
            rows = order_list[bounds[e]:bounds[e + 1]]
            if not rows:
                continue
            items = {keys[i]: reps[i] for i in rows}
            ops = [map_operations.map_put_items(bin_name, items, map_policy=policy), *retention]
            writes.append(Write(self._key(entity_type, check_part("entity_id", entity_id)), ops,
                                policy=write_policy))
        self._batch_write("put_blocks", writes)

    #: a write's retention is one range removal per (feature, size) on every record it
    #: touches (18 for a user of the default features): 47% more events/s into a local
    #: server without them, so the blocks flow sweeps instead (``drop_expired``)
    sweeps_expired = True
    #: seconds between polls of a sweep's background job (``wait=True``)
    SWEEP_POLL_S = 0.05

    def drop_expired(self, entity_type: str, family: str, feature_keys: Iterable[str],
                     keep_after: Mapping[int, int], *, wait: bool = True) -> None:
        """One background query over the entity type's set (records with the family's bin)
        applying the range removals a write's ``keep_after`` would; each record's TTL is
        left as it is. The server paces such jobs (``background-query-max-rps``, 10,000
        records/s by default), so without ``wait`` it returns once the job is started
        (``sweeping`` says whether one still runs)."""
        self._check_writable("drop_expired")
        check_part("entity_type", entity_type)
        bin_name = self._family_bin(check_part("family", family))
        ops = _retention_ops(bin_name, feature_keys, keep_after)
        if not ops:
            return
        with self._errors("drop_expired"):
            query = self.client.query(self.namespace, entity_type)
            query.add_ops(ops)
            query.ttl = aerospike.TTL_DONT_UPDATE
            job = query.execute_background(
                {"expressions": expressions.BinExists(bin_name).compile()})
        self._sweeps.append(job)
        while wait and self.sweeping():
            time.sleep(self.SWEEP_POLL_S)

    def sweeping(self) -> bool:
        """Whether a sweep this store started (``drop_expired``) still runs on the server (a
        job the server no longer knows, or cannot tell about, is counted as ended)."""
        running = []
        for job in self._sweeps:
            try:
                info = self.client.job_info(job, aerospike.JOB_QUERY)
            except aerospike_exception.AerospikeError:
                continue
            if info["status"] != aerospike.JOB_STATUS_COMPLETED:
                running.append(job)
        self._sweeps = running
        return bool(running)

    def get_block_tables(
        self, entity_type: str, family: str, entity_ids: Sequence[str]
    ) -> list[BlockTable | None]:
        bin_name = family_bin(family)
        records = self._batch_read("get_block_tables", entity_type, entity_ids, [bin_name])
        return [
            blocktable_from_map(r[bin_name]) if r is not None and r.get(bin_name) else None
            for r in records
        ]

    def list_entity_ids(self, entity_type: str, family: str) -> Iterator[str]:
        bin_name = family_bin(family)
        found: list[str] = []

        def collect(record) -> None:
            key, _meta, bins = record
            if (bins or {}).get(bin_name) and key[2] is not None:
                found.append(str(key[2]))

        with self._errors("list_entity_ids"):
            query = self.client.query(self.namespace, entity_type)
            query.select(bin_name)
            query.foreach(collect)
        yield from found

    def delete_blocks_before(self, entity_type: str, family: str, ts: int) -> int:
        self._check_writable("delete_blocks_before")
        bin_name = family_bin(family)
        found: list[tuple[tuple, list[bytes], int]] = []

        def collect(record) -> None:
            key, _meta, bins = record
            blocks = (bins or {}).get(bin_name)
            if blocks:
                drop = blocks_to_drop(blocks, ts)
                if drop:
                    found.append((key, drop, len(blocks)))

        with self._errors("delete_blocks_before"):
            query = self.client.query(self.namespace, entity_type)
            query.select(bin_name)
            query.foreach(collect)
        dropped = 0
        for key, drop, _total in found:
            with self._errors("delete_blocks_before"):
                _, meta, bins = self.client.operate(
                    key,
                    [
                        map_operations.map_remove_by_key_list(
                            bin_name, drop, aerospike.MAP_RETURN_COUNT
                        ),
                        map_operations.map_size(bin_name),
                    ],
                )
            dropped += len(drop)
            if not bins.get(bin_name):  # map empty: drop the bin, unless a write raced us
                try:
                    self.client.remove_bin(
                        key,
                        [bin_name],
                        meta={"gen": meta["gen"]},
                        policy={"gen": aerospike.POLICY_GEN_EQ},
                    )
                except aerospike_exception.RecordGenerationError:
                    pass
        return dropped

    # ------------------------------------------------------------------ sequences

    def append_sequence(self, entity_type: str, rows: Sequence[SequenceRow], max_len: int) -> None:
        self._check_writable("append_sequence")
        check_part("entity_type", entity_type)
        if max_len <= 0:
            raise StoreError(f"max_len must be a positive int, got {max_len!r}")
        flags = (
            aerospike.MAP_WRITE_FLAGS_CREATE_ONLY
            | aerospike.MAP_WRITE_FLAGS_NO_FAIL
            | aerospike.MAP_WRITE_FLAGS_PARTIAL
        )
        policy = {"map_order": aerospike.MAP_KEY_ORDERED, "map_write_flags": flags}
        writes = [
            Write(
                self._key(entity_type, check_part("entity_id", e)),
                [
                    map_operations.map_put_items(SEQUENCE_BIN, items, map_policy=policy),
                    map_operations.map_remove_by_rank_range(
                        SEQUENCE_BIN, -max_len, max_len, aerospike.MAP_RETURN_NONE, inverted=True
                    ),
                ],
                policy=self._entity_write(),
            )
            for e, items in sequence_items(rows).items()
        ]
        self._batch_write("append_sequence", writes)

    def get_sequences(
        self, entity_type: str, entity_ids: Sequence[str], max_len: int | None = None
    ) -> list[ActionSequence]:
        records = self._batch_read("get_sequences", entity_type, entity_ids, [SEQUENCE_BIN])
        return [sequence_from_map((r or {}).get(SEQUENCE_BIN), max_len) for r in records]

    # ------------------------------------------------------------------ values

    def _columns_record(self, entity_type: str, table: str) -> tuple:
        # length-prefixed: no two (entity type, table) pairs give the same key
        return self._key(META_SET, f"{_INTERNAL}values:{len(entity_type)}:{entity_type}:{table}")

    def put_values(
        self, entity_type: str, table: str, rows: Sequence[ValueRow], columns: Sequence[str]
    ) -> None:
        self._check_writable("put_values")
        check_part("entity_type", entity_type)
        cols = [str(c) for c in columns]
        if len(set(cols)) != len(cols):
            raise StoreError(f"put_values: column names must be unique, got {cols!r}")
        cid = columns_id(cols)
        bin_name = values_bin(check_part("table", table))
        writes = [
            Write(
                self._key(entity_type, check_part("entity_id", e)),
                [operations.write(bin_name, encode_value(v, wm, cid, len(cols)))],
                policy=self._entity_write(),
            )
            for e, v, wm in rows
        ]
        cols_json = json.dumps(cols)
        with self._errors("put_values"):
            self.client.operate(
                self._columns_record(entity_type, table),
                [
                    operations.write("current", cols_json),
                    map_operations.map_put("lists", cid, cols_json),
                ],
                policy={"ttl": aerospike.TTL_NEVER_EXPIRE},
            )
        self._batch_write("put_values", writes)

    def get_values(self, entity_type: str, table: str, entity_ids: Sequence[str]) -> ValuesResult:
        with self._errors("get_values"):
            try:
                _, _, bins = self.client.get(self._columns_record(entity_type, table))
            except aerospike_exception.RecordNotFound:
                bins = {}
        current = tuple(json.loads(bins["current"])) if bins.get("current") else ()
        known = {int(k): tuple(json.loads(v)) for k, v in (bins.get("lists") or {}).items()}
        bin_name = values_bin(table)
        records = self._batch_read("get_values", entity_type, entity_ids, [bin_name])
        raw = [bytes(r[bin_name]) if r and r.get(bin_name) is not None else None for r in records]
        return decode_values(raw, current, known)

    # ------------------------------------------------------------------ watermarks, meta

    def set_watermark(self, name: str, ts: int) -> int:
        return self.set_watermarks({name: ts})[name]

    def set_watermarks(self, items: Mapping[str, int]) -> dict[str, int]:
        """Raise many watermarks in one write of the watermark record (see ``_marks``)."""
        self._check_writable("set_watermarks")
        want = {check_part("watermark name", n): int(ts) for n, ts in items.items()}
        if not want:
            return {}
        key = self._key(WATERMARK_SET, _MARKS_KEY)
        for _ in range(100):
            with self._errors("set_watermarks"):
                marks, gen = self._marks()
                out = {n: max(ts, marks.get(n, ts)) for n, ts in want.items()}
                rising = {n: ts for n, ts in out.items() if marks.get(n) != ts}
                if not rising:
                    return out
                policy = ({"exists": aerospike.POLICY_EXISTS_CREATE} if gen is None else
                          {"gen": aerospike.POLICY_GEN_EQ})
                extra = {"meta": {"gen": gen}} if gen is not None else {}
                try:
                    self.client.operate(
                        key, [map_operations.map_put_items(_MARKS_BIN, rising)],
                        policy={**policy, "ttl": aerospike.TTL_NEVER_EXPIRE}, **extra)
                    return out
                except (aerospike_exception.RecordGenerationError,
                        aerospike_exception.RecordExistsError):
                    continue  # another writer raised some mark first: read again
        raise StoreError(
            f"set_watermarks {sorted(want)[:3]!r}: gave up after 100 conflicting concurrent "
            "updates")

    def _marks(self) -> tuple[dict[str, int], int | None]:
        """Every watermark and the record's generation (None: no record yet).

        All watermarks live in one record (a map bin, name -> ts), so a read is one ``get``
        (a request reads them several times) and a flush's raises are one atomic write,
        made under a generation check so that a mark never goes back."""
        try:
            _, meta, bins = self.client.get(self._key(WATERMARK_SET, _MARKS_KEY))
        except aerospike_exception.RecordNotFound:
            return {}, None
        return {str(k): int(v) for k, v in (bins.get(_MARKS_BIN) or {}).items()}, meta["gen"]

    def get_watermarks(self, prefix: str = "") -> dict[str, int]:
        with self._errors("get_watermarks"):
            marks, _ = self._marks()
        return {n: ts for n, ts in marks.items() if n.startswith(prefix)}

    def put_meta(self, key: str, value: bytes) -> None:
        self._check_writable("put_meta")
        with self._errors("put_meta"):
            self.client.put(
                self._key(META_SET, _META_PREFIX + check_part("meta key", key)),
                {"v": bytes(value)},
                policy={"ttl": aerospike.TTL_NEVER_EXPIRE},
            )

    def get_meta(self, key: str) -> bytes | None:
        with self._errors("get_meta"):
            try:
                _, _, bins = self.client.get(self._key(META_SET, _META_PREFIX + key))
            except aerospike_exception.RecordNotFound:
                return None
        value = bins.get("v")
        return None if value is None else bytes(value)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
