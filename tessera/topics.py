"""Create, list and delete the platform's Kafka topics; shared client configs; bounded reads.

End of data on the embedded broker (verified on Tansu 0.6.0, librdkafka 2.12)
-----------------------------------------------------------------------------
Tansu's ListOffsets answer, and so ``Consumer.get_watermark_offsets``, gives a
partition's end as the *first offset of the last produced batch plus one*: with
50 000 records in batches it says 43 499. Never use it as "end of data".

The high watermark in Tansu's *Fetch* responses is right, and librdkafka's
partition EOF (``enable.partition.eof=true``, ``KafkaError._PARTITION_EOF``) is
derived from it: EOF fires once the consumer's position reaches the true end,
after every record produced (and acknowledged) before the read was delivered.
Checked with multi-record batches (linger, 3 concurrent producers, lz4 and no
compression, 1 to 250 000 records a partition, small and large fetch sizes,
reads starting at offset 0, mid-batch, and exactly at the bogus watermark), and
on empty partitions (EOF at offset 0). :func:`read_to_end` uses it.

One trap: with ``fetch.min.bytes`` larger than ``fetch.max.bytes`` Tansu makes
reads crawl (thousands of records a second); :func:`consumer_config` refuses it.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, ClassVar, Literal

from tessera.errors import TopicError
from tessera.logs import get_logger

__all__ = [
    "DEFAULT_TOPIC_CONFIG",
    "PLATFORM_TOPICS",
    "consumer_config",
    "create_topics",
    "delete_topics",
    "kafka_client_config",
    "librdkafka_is_safe",
    "list_topics",
    "producer_config",
    "read_to_end",
]

#: The platform's topics: event streams, the forward log, and the dead letters.
PLATFORM_TOPICS: tuple[str, ...] = ("views", "engagements", "impressions", "items", "deadletter")

#: Topic configs set at creation. Tansu returns a topic's configs only when they were set
#: explicitly at creation, and Quix Streams needs these two.
DEFAULT_TOPIC_CONFIG: Mapping[str, str] = {"retention.ms": "-1", "retention.bytes": "-1"}

_TOPIC_NAME = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

#: librdkafka releases before this segfault a tailing consumer about one broker restart in
#: three (``bench/faults.py broker_bounce``: 2.12 crashed, the locked 2.16 passed 6 of 6)
SAFE_LIBRDKAFKA = (2, 13)


def librdkafka_is_safe(version: str | None = None) -> tuple[str, bool]:
    """``(version, safe)``: the librdkafka in use (or ``version``), and whether it is at
    least :data:`SAFE_LIBRDKAFKA`."""
    if version is None:
        from confluent_kafka import libversion

        version = libversion()[0]
    parts = tuple(int(p) for p in re.findall(r"\d+", version)[:2])
    return version, parts >= SAFE_LIBRDKAFKA


# -- client configuration -----------------------------------------------------------


class _RdKafkaLog:
    """A librdkafka ``logger``: routes its log lines to structlog at debug level.

    librdkafka logs connection churn (``Connection refused``, ``Disconnected``) at
    error level while it reconnects on its own; on a terminal that is noise. Use
    ``tessera --log-level debug`` to see the lines; real failures still surface as
    exceptions and through ``error_cb``.
    """

    _SYSLOG_NAMES: ClassVar[dict[int, str]] = {
        0: "emerg",
        1: "alert",
        2: "crit",
        3: "error",
        4: "warning",
        5: "notice",
    }

    def __init__(self) -> None:
        self._log = get_logger("librdkafka")

    def log(self, level: int, fmt: str, *args: Any) -> None:
        """Receive one line from confluent-kafka (same signature as ``logging.Logger.log``)."""
        self._log.debug(
            fmt % args if args else fmt,
            rdkafka_level=self._SYSLOG_NAMES.get(level, "info" if level == 6 else "debug"),
        )


_KAFKA_LOG = _RdKafkaLog()


def _error_cb(err: Any) -> None:
    """Log client-level errors; fatal ones at error level, retried ones (reconnects) at debug."""
    log = get_logger("kafka")
    if err.fatal():
        log.error("kafka client fatal error", error=str(err))
    else:
        log.debug("kafka client error (retried by librdkafka)", error=str(err))


def kafka_client_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return the config every Tessera Kafka client starts from.

    Sets ``bootstrap.servers``, a ``logger`` that sends librdkafka's log to structlog
    (debug level) instead of stderr, an ``error_cb``, and a short reconnect back-off.
    librdkafka names contain dots, so pass overrides as a mapping:
    ``kafka_client_config(b, **{"client.id": "x"})``.

    Raises:
        ValueError: ``bootstrap`` is empty.
    """
    if not bootstrap or not bootstrap.strip():
        raise ValueError(
            "bootstrap must be 'host:port[,host:port...]', got an empty string; "
            "run `tessera broker start` or pass --bootstrap"
        )
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": _KAFKA_LOG,
        "error_cb": _error_cb,
        "reconnect.backoff.ms": 50,
        "reconnect.backoff.max.ms": 1000,
    }
    config.update(overrides)
    return config


def consumer_config(
    bootstrap: str,
    group_id: str | None = None,
    *,
    fast: bool = True,
    partition_eof: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Return a consumer config.

    Args:
        bootstrap: Kafka bootstrap address.
        group_id: consumer group. ``None`` makes a private reader for manual
            ``assign()``: a unique group id and no offset commits.
        fast: batch fetches (``fetch.min.bytes`` 1 MiB, ``fetch.wait.max.ms`` 50,
            ``queued.min.messages`` 1 000 000, at most 16 MiB a partition); on the
            embedded broker this raised the consume rate from about 120 k to several
            hundred k records a second.
        partition_eof: emit ``KafkaError._PARTITION_EOF`` when a partition is read to
            its end (for bounded reads; see the module docstring).
        overrides: any librdkafka setting, applied last.

    Group subscription gets ``session.timeout.ms`` 6000 and ``heartbeat.interval.ms``
    1000, which the embedded broker needs to rebalance quickly.

    Raises:
        ValueError: ``fetch.min.bytes`` exceeds ``fetch.max.bytes`` (reads crawl on Tansu).
    """
    config = kafka_client_config(
        bootstrap,
        **{
            "group.id": group_id or f"tessera-reader-{uuid.uuid4().hex[:12]}",
            "enable.auto.commit": group_id is not None,
            "auto.offset.reset": "earliest",
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
            "enable.partition.eof": partition_eof,
        },
    )
    if fast:
        config.update(
            {
                "fetch.min.bytes": 1048576,
                "fetch.wait.max.ms": 50,
                "queued.min.messages": 1000000,
                # ... but at most 16 MiB of messages a partition: librdkafka's per-message
                # overhead made a 4-partition reader of single-event messages hold ~1 GB
                "queued.max.messages.kbytes": 16384,
            }
        )
    config.update(overrides)
    min_bytes = int(config.get("fetch.min.bytes", 1))
    max_bytes = int(config.get("fetch.max.bytes", 52428800))
    if min_bytes > max_bytes:
        raise ValueError(
            f"fetch.min.bytes ({min_bytes}) must not exceed fetch.max.bytes ({max_bytes}): "
            "the broker would wait for more than it may send; lower fetch.min.bytes"
        )
    return config


def producer_config(bootstrap: str, **overrides: Any) -> dict[str, Any]:
    """Return a producer config: ``linger.ms`` 5, lz4 batches up to 1 MB, ``acks`` all.

    ``queue.buffering.max.messages`` is raised to 1 000 000 so bulk producers (the
    event generator, replays) do not hit ``BufferError`` between ``poll()`` calls.

    ``allow.auto.create.topics`` is off: a producer never creates a topic. A broker that
    auto-creates (Tansu does, with 4 partitions) would otherwise make a missing topic with
    its own partition count, not the one ``create_topics`` declares, and a source that
    listed the topic's partitions earlier never reads the others. A message to a topic
    that does not exist yet waits in the queue until the topic is created (or fails after
    ``topic.metadata.propagation.max.ms``, 30 s).
    """
    config = kafka_client_config(
        bootstrap,
        **{
            "linger.ms": 5,
            "compression.type": "lz4",
            "batch.size": 1000000,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 1000000,
            "acks": "all",
            "allow.auto.create.topics": False,
        },
    )
    config.update(overrides)
    return config


# -- topics --------------------------------------------------------------------------


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient(kafka_client_config(bootstrap))


def _check_name(name: str) -> None:
    if not _TOPIC_NAME.match(name) or name in (".", ".."):
        raise TopicError(
            f"invalid topic name {name!r}: use 1 to 249 characters from "
            "letters, digits, '.', '_' and '-'"
        )


def _kafka_error(exc: BaseException) -> Any:
    """Return the ``KafkaError`` inside a ``KafkaException`` (or ``None``)."""
    return exc.args[0] if exc.args and hasattr(exc.args[0], "code") else None


def list_topics(
    bootstrap: str, *, timeout_s: float = 10.0, include_internal: bool = False
) -> dict[str, int]:
    """Return ``{topic: partition count}``, sorted by name.

    Args:
        include_internal: also list topics whose names start with ``__``.

    Raises:
        TopicError: the broker did not answer within ``timeout_s``.
    """
    from confluent_kafka import KafkaException

    try:
        metadata = _admin(bootstrap).list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicError(
            f"could not list topics at {bootstrap} within {timeout_s:g}s: {exc}; "
            "is the broker running? (`tessera broker status`)"
        ) from exc
    return {
        name: len(meta.partitions)
        for name, meta in sorted(metadata.topics.items())
        if include_internal or not name.startswith("__")
    }


def create_topics(
    bootstrap: str,
    names: Iterable[str] = PLATFORM_TOPICS,
    *,
    partitions: int = 4,
    replication: int = 1,
    config: Mapping[str, str] | None = None,
    timeout_s: float = 10.0,
) -> list[str]:
    """Create the topics that do not exist yet; existing ones are left as they are.

    Args:
        names: topic names; defaults to :data:`PLATFORM_TOPICS`.
        partitions: partitions of each new topic (at least 1).
        replication: replication factor (1 on the embedded broker).
        config: topic configs, applied over :data:`DEFAULT_TOPIC_CONFIG` (the
            retention settings are always set explicitly; Tansu reports only those).

    Returns:
        The names that were created by this call, in the order given.

    Raises:
        ValueError: ``partitions`` or ``replication`` is below 1.
        TopicError: a name is invalid, or the broker refused or did not answer.
    """
    from confluent_kafka.admin import NewTopic

    names = list(dict.fromkeys(names))
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    if replication < 1:
        raise ValueError(f"replication must be at least 1, got {replication}")
    for name in names:
        _check_name(name)
    if not names:
        return []
    topic_config = {**DEFAULT_TOPIC_CONFIG, **(config or {})}
    new = [NewTopic(n, partitions, replication, config=dict(topic_config)) for n in names]
    admin = _admin(bootstrap)  # keep a reference: the futures fail once it is collected
    futures = admin.create_topics(new, operation_timeout=timeout_s, request_timeout=timeout_s)
    return _collect(futures, names, action="create", ok_codes=("TOPIC_ALREADY_EXISTS",))


def delete_topics(bootstrap: str, names: Iterable[str], *, timeout_s: float = 10.0) -> list[str]:
    """Delete topics; names that do not exist are skipped.

    Returns:
        The names that were deleted by this call.

    Raises:
        TopicError: the broker refused or did not answer.
    """
    names = list(dict.fromkeys(names))
    if not names:
        return []
    admin = _admin(bootstrap)  # keep a reference: the futures fail once it is collected
    futures = admin.delete_topics(names, operation_timeout=timeout_s, request_timeout=timeout_s)
    return _collect(futures, names, action="delete", ok_codes=("UNKNOWN_TOPIC_OR_PART",))


def _collect(
    futures: Mapping[str, Any], names: Sequence[str], *, action: str, ok_codes: Sequence[str]
) -> list[str]:
    from confluent_kafka import KafkaException

    done: list[str] = []
    failed: list[str] = []
    for name in names:
        try:
            futures[name].result()
            done.append(name)
        except KafkaException as exc:
            err = _kafka_error(exc)
            if err is not None and err.name() in ok_codes:
                continue
            failed.append(f"{name}: {err.str() if err is not None else exc}")
    if failed:
        raise TopicError(f"could not {action} topics: " + "; ".join(failed))
    return done


# -- bounded reads -------------------------------------------------------------------


def read_to_end(
    bootstrap: str,
    topic: str,
    *,
    partitions: Iterable[int] | None = None,
    start: Literal["beginning"] | Mapping[int, int] = "beginning",
    idle_timeout_s: float = 10.0,
    batch_size: int = 10000,
    **overrides: Any,
) -> Iterator[Any]:
    """Yield the records of ``topic`` from ``start`` up to the end of each partition.

    "End" is librdkafka's partition EOF, which on the embedded broker fires only
    after every acknowledged record was delivered (see the module docstring); the
    high watermark is *not* used. Records produced while the read is running may
    or may not be included. No offsets are committed.

    Args:
        partitions: partition ids to read; defaults to all of them.
        start: ``"beginning"``, or ``{partition: offset}`` for each partition read.
        idle_timeout_s: give up when no record and no EOF arrives for this long.
        batch_size: records fetched per ``consume()`` call.
        overrides: librdkafka consumer settings (see :func:`consumer_config`).

    Yields:
        ``confluent_kafka.Message`` objects without errors, in offset order within each
        partition (partitions interleave).

    Raises:
        TopicError: the topic does not exist, a partition is unknown, the consumer
            reports an error, or the read stalls for ``idle_timeout_s``.
    """
    from confluent_kafka import (
        OFFSET_BEGINNING,
        Consumer,
        KafkaError,
        KafkaException,
        TopicPartition,
    )

    consumer = Consumer(consumer_config(bootstrap, partition_eof=True, **overrides))
    try:
        # Metadata first: it checks the topic, and a client that already knows the partition
        # leaders skips librdkafka's 500 ms offset-query retry timer after assign().
        try:
            metadata = consumer.list_topics(timeout=idle_timeout_s)
        except KafkaException as exc:
            raise TopicError(f"could not read metadata from {bootstrap}: {exc}") from exc
        if topic not in metadata.topics:
            raise TopicError(
                f"topic {topic!r} does not exist at {bootstrap}; create it with "
                f"`tessera topics create {topic}`"
            )
        count = len(metadata.topics[topic].partitions)
        wanted = sorted(set(partitions)) if partitions is not None else list(range(count))
        unknown = [p for p in wanted if not 0 <= p < count]
        if unknown:
            raise TopicError(f"topic {topic!r} has partitions 0..{count - 1}, got {unknown}")
        if start == "beginning":
            offsets = {p: OFFSET_BEGINNING for p in wanted}
        else:
            missing = [p for p in wanted if p not in start]
            if missing:
                raise TopicError(f"start offsets are missing for partitions {missing} of {topic!r}")
            offsets = {p: int(start[p]) for p in wanted}
        if not wanted:
            return
        consumer.assign([TopicPartition(topic, p, offsets[p]) for p in wanted])
        pending = set(wanted)
        last_progress = time.monotonic()
        while pending:
            messages = consumer.consume(batch_size, timeout=0.05)
            if messages:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > idle_timeout_s:
                raise TopicError(
                    f"reading {topic!r} stalled: no record or end-of-partition for "
                    f"{idle_timeout_s:g}s on partitions {sorted(pending)}"
                )
            for message in messages:
                err = message.error()
                if err is None:
                    yield message
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition())
                else:
                    raise TopicError(f"reading {topic!r} failed: {err.str()}")
    finally:
        consumer.close()
