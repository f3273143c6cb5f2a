"""Write generated events to Kafka, to Parquet, or to plain Python records."""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from schemas.codec import encode
from schemas.columnar import DictColumn, EventColumns, columns_to_records, encode_batch
from schemas.registry import DEADLETTER_TOPIC, TOPICS, topic_schema
from tessera.logs import get_logger
from tessera.synth.errors import SinkError
from tessera.synth.generate import EMIT_ORDER, GenerationSummary, generate_events
from tessera.synth.world import WorldConfig

PARTITION_KEY: dict[str, str] = {
    "views": "user_id",
    "impressions": "user_id",
    "engagements": "user_id",
    "items": "item_id",
}
"""Field whose stable hash picks the partition: one user's events stay ordered in one partition."""

DEFAULT_PRODUCER_CONFIG: dict[str, Any] = {
    "linger.ms": 20,
    "batch.num.messages": 100_000,
    "queue.buffering.max.messages": 1_000_000,
    "queue.buffering.max.kbytes": 1024 * 1024,
    "compression.type": "lz4",
}
"""Bulk-producer settings applied over ``tessera.topics.producer_config`` (which routes
librdkafka's log to structlog instead of stderr)."""


def partition_of(key: str, n_partitions: int) -> int:
    """Return the partition of ``key``: ``crc32(utf-8 key) % n_partitions`` (stable across runs)."""
    return zlib.crc32(key.encode("utf-8")) % n_partitions


def partitions_of(col: DictColumn, n_partitions: int) -> np.ndarray:
    """Return the partition of every row of a dictionary column (one hash per distinct value)."""
    per_value = np.fromiter(
        (partition_of(v, n_partitions) for v in col.dictionary.tolist()),
        dtype=np.int64,
        count=len(col.dictionary),
    )
    return per_value[col.codes]


def compact(cols: EventColumns) -> EventColumns:
    """Drop unused dictionary entries of every string column (after a ``take``)."""
    out: dict[str, Any] = {}
    for name, c in cols.columns.items():
        if isinstance(c, DictColumn) and len(c.dictionary) > len(c.codes):
            used, inv = np.unique(c.codes, return_inverse=True)
            if len(used) and used[0] == -1:  # keep nulls as -1
                inv = inv - 1
                used = used[1:]
            out[name] = DictColumn(inv.astype(np.int32).reshape(-1), c.dictionary[used])
        else:
            out[name] = c
    return EventColumns(cols.topic, cols.n, out)


# ---------------------------------------------------------------- in memory


def generate_records(config: WorldConfig) -> dict[str, list[dict[str, Any]]]:
    """Return every valid event of ``config`` as Avro-ready dicts per topic, in emission order.

    Meant for small worlds (tests, oracles); malformed payloads are not included.
    """
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in TOPICS}
    for chunk in generate_events(config):
        for topic, cols in chunk.columns.items():
            out[topic].extend(columns_to_records(cols))
    return out


# ---------------------------------------------------------------- Parquet


def arrow_schema(topic: str) -> Any:
    """Return the ``pyarrow`` schema of ``topic``: one column per Avro field, same order."""
    import pyarrow as pa

    simple = {
        "string": pa.string(),
        "enum": pa.string(),
        "long": pa.int64(),
        "int": pa.int32(),
        "double": pa.float64(),
        "float": pa.float32(),
        "boolean": pa.bool_(),
        "bytes": pa.binary(),
    }
    fields = []
    for f in topic_schema(topic).fields:
        if f.kind == "map":
            value = pa.string() if f.map_values == "string" else pa.float64()
            typ = pa.map_(pa.string(), value)
        else:
            typ = simple[f.kind]
        fields.append(pa.field(f.name, typ, nullable=f.nullable))
    return pa.schema(fields)


def _map_array(col: np.ndarray, typ: Any) -> Any:
    import pyarrow as pa

    maps = col.tolist()
    lengths = np.fromiter((len(m) for m in maps), np.int32, len(maps))
    offsets = np.zeros(len(maps) + 1, np.int32)
    np.cumsum(lengths, out=offsets[1:])
    keys = pa.array([k for m in maps for k in m], type=typ.key_type)
    items = pa.array([v for m in maps for v in m.values()], type=typ.item_type)
    return pa.MapArray.from_arrays(pa.array(offsets), keys, items, type=typ)


def to_arrow(cols: EventColumns) -> Any:
    """Convert ``cols`` into a ``pyarrow.Table`` with ``arrow_schema(cols.topic)``."""
    import pyarrow as pa

    schema = arrow_schema(cols.topic)
    arrays = []
    for f in schema:
        c = cols.columns[f.name]
        if isinstance(c, DictColumn):
            mask = c.codes < 0
            codes = pa.array(c.codes, type=pa.int32(), mask=mask if mask.any() else None)
            dictionary = pa.array(c.dictionary.tolist(), type=pa.string())
            arrays.append(pa.DictionaryArray.from_arrays(codes, dictionary).cast(f.type))
        elif pa.types.is_map(f.type):
            arrays.append(_map_array(c, f.type))
        else:
            arrays.append(pa.array(np.asarray(c), type=f.type))
    return pa.Table.from_arrays(arrays, schema=schema)


def write_to_parquet(
    config: WorldConfig,
    out_dir: str | Path,
    *,
    compression: str = "zstd",
) -> GenerationSummary:
    """Write the valid events of ``config`` to ``out_dir/<topic>.parquet``, one row group per chunk.

    Rows are in emission order; columns are the topic's Avro fields (strings and enums as
    strings, maps as Arrow maps). Malformed payloads cannot be rows: they are counted in the
    summary, not written.

    Returns:
        The summary; ``bytes`` holds each file's size and ``messages`` its row groups.
    """
    import pyarrow.parquet as pq

    log = get_logger("synth.parquet")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = GenerationSummary()
    writers = {
        t: pq.ParquetWriter(out / f"{t}.parquet", arrow_schema(t), compression=compression)
        for t in TOPICS
    }
    t0 = time.perf_counter()
    try:
        for chunk in generate_events(config):
            summary.add(chunk)
            for topic, cols in chunk.columns.items():
                if cols.n:
                    writers[topic].write_table(to_arrow(cols))
                    summary.messages[topic] += 1
    finally:
        for w in writers.values():
            w.close()
    summary.elapsed_s = time.perf_counter() - t0
    for t in TOPICS:
        summary.bytes[t] = (out / f"{t}.parquet").stat().st_size
    if summary.total_malformed:
        log.warning("malformed payloads are not written to parquet", count=summary.total_malformed)
    log.info(
        "parquet written", dir=str(out), events=summary.total_events, s=round(summary.elapsed_s, 2)
    )
    return summary


# ---------------------------------------------------------------- Kafka


def ensure_topics(
    bootstrap: str,
    topics: Iterable[str],
    *,
    partitions: int,
    create: bool,
) -> dict[str, int]:
    """Return the partition count of each topic, creating missing ones when ``create``.

    Raises:
        SinkError: a topic is missing and ``create`` is false.
        TopicError: the broker did not answer or refused to create a topic.
    """
    from tessera.topics import create_topics, list_topics

    names = list(dict.fromkeys(topics))
    known = list_topics(bootstrap)
    missing = [t for t in names if t not in known]
    if missing and not create:
        raise SinkError(
            f"topic(s) {', '.join(missing)} do not exist at {bootstrap}; create them with "
            f"`tessera topics create {' '.join(missing)}` or pass --create-topics"
        )
    if missing:
        create_topics(bootstrap, missing, partitions=partitions)
        deadline = time.monotonic() + 30.0
        while not all(known.get(t) for t in names):
            if time.monotonic() > deadline:
                raise SinkError(f"topic(s) {', '.join(missing)} did not appear at {bootstrap}")
            time.sleep(0.1)
            known = list_topics(bootstrap)
    return {t: known[t] for t in names}


class _Producer:
    """A confluent-kafka producer that retries on a full queue and records delivery errors."""

    def __init__(self, bootstrap: str, overrides: Mapping[str, Any] | None):
        from confluent_kafka import Producer

        from tessera.topics import producer_config

        self.producer = Producer(
            producer_config(bootstrap, **{**DEFAULT_PRODUCER_CONFIG, **(overrides or {})})
        )
        self.errors: list[str] = []
        self.delivered = 0

    def _on_delivery(self, err: Any, msg: Any) -> None:
        if err is not None:
            if len(self.errors) < 10:
                self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")
        else:
            self.delivered += 1

    def produce(self, topic: str, value: bytes, *, partition: int, key: bytes | None) -> None:
        while True:
            try:
                self.producer.produce(
                    topic, value=value, key=key, partition=partition, on_delivery=self._on_delivery
                )
                break
            except BufferError:
                self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout_s: float) -> None:
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise SinkError(f"{remaining} messages were not delivered within {timeout_s:.0f} s")
        if self.errors:
            raise SinkError("delivery failed: " + "; ".join(self.errors))


def write_to_kafka(
    config: WorldConfig,
    bootstrap: str,
    *,
    batch_events: int = 1000,
    topics: Mapping[str, str] | None = None,
    create_topics: bool = False,
    partitions: int = 4,
    producer_config: Mapping[str, Any] | None = None,
    progress_every_s: float = 5.0,
    flush_timeout_s: float = 120.0,
    clock: Callable[[], float] = time.monotonic,
) -> GenerationSummary:
    """Generate the events of ``config`` and produce them to Kafka.

    Partitioning: each event goes to ``crc32(key) % n_partitions`` of its topic, the key being
    ``user_id`` (``item_id`` on ``items``), so one user's events stay in order in one
    partition. With ``batch_events > 1`` each message is a columnar batch (schema id 100) of
    up to ``batch_events`` events of one partition, with no message key; with
    ``batch_events == 1`` each message is one framed Avro event keyed by its user (item) id.
    Malformed payloads go as raw messages to the same topic, on partition 0... n-1 in turn.

    Args:
        config: the world to generate.
        bootstrap: Kafka bootstrap servers.
        batch_events: events per message (1 = one single-event message per event).
        topics: actual topic name per logical topic (default: the same names).
        create_topics: create missing topics with ``partitions`` partitions.
        partitions: partitions of created topics.
        producer_config: librdkafka settings overriding ``DEFAULT_PRODUCER_CONFIG``.
        progress_every_s: seconds between progress log lines.
        flush_timeout_s: how long the final flush may take.
        clock: monotonic clock (for tests).

    Raises:
        SinkError: the broker is unreachable, a topic is missing, or delivery failed.
    """
    if not isinstance(batch_events, int) or batch_events < 1:
        raise SinkError(f"batch_events must be an integer >= 1, got {batch_events!r}")
    log = get_logger("synth.kafka")
    names = {t: (topics or {}).get(t, t) for t in TOPICS}
    # the workers refuse to start without the dead-letter topic: create it with the others
    wanted = [*names.values(), *([DEADLETTER_TOPIC] if create_topics else [])]
    n_parts = ensure_topics(bootstrap, wanted, partitions=partitions, create=create_topics)
    producer = _Producer(bootstrap, producer_config)
    summary = GenerationSummary()
    t0 = last = clock()
    last_events = 0
    bad_rr = 0
    for chunk in generate_events(config):
        summary.add(chunk)
        for topic in EMIT_ORDER:
            cols, name = chunk.columns[topic], names[topic]
            np_ = n_parts[name]
            if cols.n:
                key_col = cols.columns[PARTITION_KEY[topic]]
                part = partitions_of(key_col, np_)  # type: ignore[arg-type]
                if batch_events == 1:
                    keys = key_col.values().tolist()  # type: ignore[union-attr]
                    for rec, p, k in zip(
                        columns_to_records(cols), part.tolist(), keys, strict=True
                    ):
                        value = encode(topic, rec)
                        producer.produce(name, value, partition=p, key=k.encode())
                        summary.messages[topic] += 1
                        summary.bytes[topic] += len(value)
                else:
                    order = np.argsort(part, kind="stable")
                    bounds = np.searchsorted(part[order], np.arange(np_ + 1))
                    for p in range(np_):
                        rows = order[bounds[p] : bounds[p + 1]]
                        for s in range(0, len(rows), batch_events):
                            value = encode_batch(compact(cols.take(rows[s : s + batch_events])))
                            producer.produce(name, value, partition=p, key=None)
                            summary.messages[topic] += 1
                            summary.bytes[topic] += len(value)
            for payload in chunk.malformed[topic]:
                producer.produce(name, payload, partition=bad_rr % np_, key=None)
                bad_rr += 1
                summary.messages[topic] += 1
                summary.bytes[topic] += len(payload)
        now = clock()
        if now - last >= progress_every_s:
            rate = (summary.total_events - last_events) / (now - last)
            log.info(
                "producing",
                events=summary.total_events,
                events_per_s=round(rate),
                chunk=chunk.index,
            )
            last, last_events = now, summary.total_events
    producer.flush(flush_timeout_s)
    summary.elapsed_s = clock() - t0
    log.info(
        "produced",
        events=summary.total_events,
        malformed=summary.total_malformed,
        late=summary.total_late,
        messages=sum(summary.messages.values()),
        events_per_s=round(summary.events_per_s),
    )
    return summary
