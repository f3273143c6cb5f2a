"""The sequences dataflow: Kafka views and engagements -> each user's recent actions.

    kafka (KafkaBatchSource: decode; lateness ignored, late events included)
      ├─ dead letters (undecodable) ──────────────────▶ deadletter topic
      ├─ to_rows: columns -> SequenceRows ─┬─ invalid ids ▶ deadletter topic (stage validate)
      │                                    └─ rows ──────▶ SequenceSink:
      │                                                    store.append_sequence("user", ...)

A user's sequence is the newest ``max_len`` actions by ``(ts, item_id, event_id)`` (the
tie order of ``last_n`` blocks), most recent first:
views become action ``"view"``, engagements keep their ``action`` (click, like, share, save,
hide); both carry ``dwell_ms``. A declared source with string ``user_id`` and ``item_id``
fields is a sequence topic too (``is_sequence_topic``): its action is its ``action`` field
when it has one, else the source's name, and its dwell its ``dwell_ms`` field, else 0.
``append_sequence`` is idempotent on ``event_id`` and its
order is total, so the flow holds no Bytewax state: after a crash the source replays from its
last snapshot (or from the beginning without ``recovery_dir``) and the store ends up exactly
as if every event had been written once.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import bytewax.operators as op
import numpy as np
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition

from dataflows.kafka_source import KafkaBatchSource, SourceBatch
from dataflows.progress import FlowProgress
from dataflows.sinks import DeadLetterSink, write_until_stored
from features.store.base import SequenceRow
from schemas.codec import DeadLetter, encode
from schemas.columnar import DictColumn, EventColumns, columns_to_records
from tessera.logs import get_logger

log = get_logger("dataflows.sequences")

#: The entity type sequences are stored under.
ENTITY_TYPE = "user"
#: The action a view becomes in a sequence.
VIEW_ACTION = "view"
#: Built-in topics the flow can read: the ones that carry user actions.
SEQUENCE_TOPICS: tuple[str, ...] = ("views", "engagements")


def is_sequence_topic(topic: str) -> bool:
    """Whether ``topic`` carries user actions: views, engagements, or a declared source with
    string ``user_id`` and ``item_id`` fields."""
    if topic in SEQUENCE_TOPICS:
        return True
    from schemas.registry import TOPICS, is_event_topic, topic_schema

    if topic in TOPICS or not is_event_topic(topic):
        return False
    kinds = {f.name: f.kind for f in topic_schema(topic).fields}
    return kinds.get("user_id") == "string" and kinds.get("item_id") == "string"


@dataclass(frozen=True, kw_only=True)
class SequencesFlowConfig:
    """Everything a sequences worker needs; frozen and validated at definition.

    Args:
        bootstrap: Kafka bootstrap servers.
        store_url: online store URL (``lmdb://...``, ``aerospike://...``).
        topics: topics to read, a subset of ``("views", "engagements")``.
        max_len: actions kept per user (the newest by ``(ts, item_id, event_id)``).
        bounded: stop at the end of the topics instead of tailing them.
        batch_messages: Kafka messages per consume call (each may be a batch envelope).
        deadletter_topic: where undecodable or invalid events go.
    """

    bootstrap: str
    store_url: str
    topics: tuple[str, ...] = SEQUENCE_TOPICS
    max_len: int = 100
    bounded: bool = False
    batch_messages: int = 500
    #: events further ahead of the wall clock are dead-lettered (None: no check)
    max_future_ms: int | None = 3_600_000
    deadletter_topic: str = "deadletter"
    #: topic -> horizon (ms) within which an event id is read once (the features file's
    #: ``deduplicate:``; the sequence writes are idempotent on event id besides)
    deduplicate: Mapping[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "topics", tuple(self.topics))
        if not self.topics:
            raise ValueError(f"topics must name at least one of {list(SEQUENCE_TOPICS)}, got ()")
        unknown = [t for t in self.topics if not is_sequence_topic(t)]
        if unknown:
            raise ValueError(
                f"topics {unknown} carry no user actions; sequences read "
                f"{list(SEQUENCE_TOPICS)} and declared sources with string user_id and "
                "item_id fields"
            )
        if len(set(self.topics)) != len(self.topics):
            raise ValueError(f"topics must not repeat, got {list(self.topics)}")
        for name in ("max_len", "batch_messages"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")


@dataclass
class SequenceRows:
    """The sequence rows of one source batch, plus the events rejected as invalid."""

    rows: list[SequenceRow]
    rejected: list[DeadLetter]


def _bad_ids(col: DictColumn) -> np.ndarray:
    """Mask of the events whose id cannot be a store key part (null, empty, NUL inside)."""
    bad_entry = np.fromiter(
        (not v or "\x00" in v for v in col.dictionary.tolist()),
        dtype=bool,
        count=len(col.dictionary),
    )
    return np.append(bad_entry, True)[np.asarray(col.codes)]  # code -1 (null) is bad


def columns_to_rows(cols: EventColumns) -> tuple[list[SequenceRow], np.ndarray]:
    """Return the ``SequenceRow`` of each valid event of ``cols`` and the invalid-event mask.

    Views get action ``"view"``; engagements keep theirs. Events whose ``user_id`` or
    ``event_id`` is empty, null or holds a NUL character are invalid (the store cannot key
    them); they are left out of the rows and flagged in the mask.

    Raises:
        ValueError: ``cols`` is not of a sequence topic.
    """
    if not is_sequence_topic(cols.topic):
        raise ValueError(
            f"topic {cols.topic!r} carries no user actions; expected one of {list(SEQUENCE_TOPICS)}"
        )
    c = cols.columns
    bad = _bad_ids(c["user_id"]) | _bad_ids(c["event_id"])  # type: ignore[arg-type]
    good = cols if not bad.any() else cols.filter(~bad)
    n = good.n
    if not n:
        return [], bad
    g = good.columns
    users = good.values("user_id").tolist()
    items = [v if v is not None else "" for v in good.values("item_id").tolist()]
    events = good.values("event_id").tolist()
    ts = np.asarray(g["event_ts"], dtype=np.int64).tolist()
    dwell = (np.asarray(g["dwell_ms"], dtype=np.int64).tolist() if "dwell_ms" in g
             else [0] * n)
    if cols.topic == "views":
        actions: list[str] | tuple[str, ...] = (VIEW_ACTION,) * n
    elif "action" in g:
        actions = good.values("action").tolist()
    else:  # a declared source without an action field: its name
        actions = (cols.topic,) * n
    return list(zip(users, ts, items, actions, dwell, events, strict=True)), bad


def batch_to_rows(batch: SourceBatch) -> SequenceRows:
    """Map one source batch to sequence rows; invalid events become ``validate`` dead letters."""
    rows, bad = columns_to_rows(batch.columns)
    rejected: list[DeadLetter] = []
    if bad.any():
        idx = np.flatnonzero(bad)
        offsets = batch.offsets[idx].tolist() if batch.offsets is not None else [-1] * len(idx)
        now = int(time.time() * 1000)
        for rec, off in zip(columns_to_records(batch.columns.take(idx)), offsets, strict=True):
            try:
                payload = encode(batch.topic, rec)
            except Exception:
                payload = repr(rec).encode()
            rejected.append(
                DeadLetter(
                    topic=batch.topic,
                    partition=batch.partition,
                    offset=int(off),
                    payload=payload,
                    key=None,
                    stage="validate",
                    failed_ts=now,
                    reason=(
                        f"user_id {rec.get('user_id')!r} / event_id {rec.get('event_id')!r}: "
                        "both must be non-empty strings without NUL characters"
                    ),
                )
            )
    return SequenceRows(rows, rejected)


class _SequencePartition(StatelessSinkPartition[list[SequenceRow]]):
    def __init__(self, store_url: str, max_len: int):
        from features.store import open_store

        self.store = open_store(store_url)
        self.max_len = max_len
        self.rows_written = 0

    def write_batch(self, items: list[list[SequenceRow]]) -> None:
        rows = [r for chunk in items for r in chunk]
        if rows:
            write_until_stored(
                "sequences", lambda: self.store.append_sequence(ENTITY_TYPE, rows, self.max_len))
            self.rows_written += len(rows)

    def close(self) -> None:
        log.info("sequence_sink_closed", rows=self.rows_written)
        self.store.close()


class SequenceSink(DynamicSink[list[SequenceRow]]):
    """Append sequence rows to the online store: one ``append_sequence`` per ``write_batch``.

    Each item is a list of rows; a write batch is one store transaction on LMDB. Appends are
    idempotent on ``event_id``, so replays after a crash leave the store unchanged.
    """

    def __init__(self, store_url: str, max_len: int):
        self.store_url = store_url
        self.max_len = max_len

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _SequencePartition:
        return _SequencePartition(self.store_url, self.max_len)


def build_sequences_flow(config: SequencesFlowConfig, progress: FlowProgress | None = None
                         ) -> Dataflow:
    """Return the Bytewax dataflow for ``config`` (run it with ``dataflows.runner.run_flow``);
    ``progress`` counts what it reads and logs ``sequences.progress`` every few seconds."""
    source = KafkaBatchSource(
        bootstrap=config.bootstrap,
        topics=config.topics,
        lateness=0,
        bounded=config.bounded,
        batch_messages=config.batch_messages,
        max_future_ms=config.max_future_ms, validate=True,
        deduplicate={t: ms for t, ms in config.deduplicate.items() if t in config.topics},
    )
    flow = Dataflow("tessera_sequences")
    batches = op.input("kafka", flow, source)
    counter = progress or FlowProgress("sequences")
    op.inspect("progress", batches, lambda _step, b: counter.observe(b))
    converted = op.map("to_rows", batches, batch_to_rows)
    dead = op.merge(
        "all_deadletters",
        op.flat_map("deadletters", batches, lambda b: b.deadletters),
        op.flat_map("rejected", converted, lambda s: s.rejected),
    )
    op.output("deadletter_out", dead, DeadLetterSink(config.bootstrap, config.deadletter_topic))
    rows = op.filter_map("rows", converted, lambda s: s.rows or None)
    op.output("store_out", rows, SequenceSink(config.store_url, config.max_len))
    return flow


__all__ = [
    "ENTITY_TYPE",
    "SEQUENCE_TOPICS",
    "VIEW_ACTION",
    "SequenceRows",
    "SequenceSink",
    "SequencesFlowConfig",
    "batch_to_rows",
    "build_sequences_flow",
    "columns_to_rows",
]
