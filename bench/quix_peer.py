"""The Quix Streams peer of the streaming bench: the same ``views`` features, Quix's way.

A Quix Streams ``Application`` reads the ``views`` topic (one Confluent-framed Avro message
per event, keyed by ``item_id``) and computes the features of a ``FeatureSet`` with its own
windowed aggregations, as a Quix user would write them:

* the value is decoded by :class:`ConfluentAvroDeserializer` (fastavro after the 5-byte
  header); the timestamp is the event's ``event_ts``;
* one branch per entity field the features aggregate on; a branch whose entity is not the
  message key first keeps the fields its features read and re-keys with ``group_by`` (a
  repartition topic, as Quix does it);
* in each branch, one tumbling event-time window per block size (``block_sizes``: 5m, 1h,
  1d, aligned to the epoch like Tessera's blocks), holding every feature of that entity as
  one ``.agg(...)`` column; a feature's filter maps its column to ``None`` for the events it
  excludes (Quix's aggregators skip ``None``);
* count/sum/mean/min/max are Quix's built-in aggregators, ``approx_distinct`` and
  ``approx_quantile`` custom aggregators over Apache DataSketches (``hll_sketch`` HLL_4,
  ``kll_doubles_sketch``; the state is the sketch image, so the state store pickles
  instead of JSON), ``last_n`` a ``Collect`` of ``[event_ts, value]`` keeping the newest n;
* windows keyed by the message key close by partition time after ``grace_ms`` (Tessera's
  lateness); windows after a ``group_by`` get ``regroup_grace_ms``, which must cover how far
  the consumer reorders event time across source partitions (a replayed backlog: all of
  it), so none of them closes during the run;
* closed windows go to :class:`WindowSink`, which keeps those of a sample of entities for
  the bench's output check; when the input is done, :func:`read_open_windows` reads the
  sample's still-open windows from the state stores (Tessera flushes its open blocks at the
  end of a bounded run; Quix has no such step).

Filters are written in Python (``bench/peer_features.py``, keyed by their text in the
feature file); a feature whose filter has no translation is refused, so a new filter in
``features.yaml`` cannot be skipped silently.

:func:`run_worker` stops the application once every message of ``views`` and of each
repartition topic was processed, and reports its timings.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import resource
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasketches as ds
from fastavro import parse_schema, schemaless_reader
from quixstreams.dataframe.windows import aggregations as qagg
from quixstreams.models import Deserializer

from bench.peer_features import Event, PeerFeature

REPO = Path(__file__).resolve().parent.parent
VIEWS_SCHEMA = REPO / "schemas" / "avro" / "views.avsc"

# -- decoding ------------------------------------------------------------------------------


class ConfluentAvroDeserializer(Deserializer):
    """Decode a Confluent-framed Avro message (magic 0, 4-byte schema id, body) to a dict."""

    def __init__(self, schema_path: Path, schema_id: int) -> None:
        super().__init__()
        self.schema = parse_schema(json.loads(schema_path.read_text()))
        self.header = bytes([0]) + schema_id.to_bytes(4, "big")

    def __call__(self, value: bytes, ctx: Any = None) -> Event:
        if value[:5] != self.header:
            raise ValueError(f"not a Confluent-framed message of schema id "
                             f"{int.from_bytes(self.header[1:], 'big')}: {bytes(value[:5])!r}")
        return schemaless_reader(io.BytesIO(value[5:]), self.schema, None)


# -- aggregators -----------------------------------------------------------------------------


def sketch_key(value: Any) -> str:
    """The string an HLL sketch is fed for ``value``.

    DataSketches ignores an empty string, while the feature counts ``''`` as a value (a view
    of an item without a topic), so every key gets a one-character prefix. Whole numbers
    are written without a decimal point (``3.0`` and ``3`` are one value).
    """
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return f"={value}"


class HllDistinct(qagg.Aggregator):
    """Approximate distinct count of ``column`` (HLL_4, ``lg_k``); the state is the sketch image."""

    def __init__(self, column: str, lg_k: int) -> None:
        super().__init__(column=column)
        self.lg_k = lg_k

    @property
    def state_suffix(self) -> str:
        return f"HllDistinct/{self.column}/{self.lg_k}"

    def initialize(self) -> bytes | None:
        return None

    def agg(self, old: bytes | None, new: Event, timestamp: int) -> bytes | None:
        value = new.get(self.column)
        if value is None:
            return old
        sketch = (ds.hll_sketch(self.lg_k, ds.tgt_hll_type.HLL_4) if old is None
                  else ds.hll_sketch.deserialize(old))
        sketch.update(sketch_key(value))
        return sketch.serialize_compact()

    def result(self, value: bytes | None) -> float:
        return 0.0 if value is None else float(ds.hll_sketch.deserialize(value).get_estimate())


class KllQuantile(qagg.Aggregator):
    """Approximate ``quantile`` of ``column`` (KLL doubles, ``k``); the state is the image."""

    def __init__(self, column: str, k: int, quantile: float) -> None:
        super().__init__(column=column)
        self.k = k
        self.quantile = quantile

    @property
    def state_suffix(self) -> str:
        return f"KllQuantile/{self.column}/{self.k}"

    def initialize(self) -> bytes | None:
        return None

    def agg(self, old: bytes | None, new: Event, timestamp: int) -> bytes | None:
        value = new.get(self.column)
        if value is None:
            return old
        sketch = (ds.kll_doubles_sketch(self.k) if old is None
                  else ds.kll_doubles_sketch.deserialize(old))
        sketch.update(float(value))
        return sketch.serialize()

    def result(self, value: bytes | None) -> float | None:
        if value is None:
            return None
        return float(ds.kll_doubles_sketch.deserialize(value).get_quantile(self.quantile))


class LastN(qagg.Collect):
    """The newest ``n`` ``[ts, value]`` pairs of ``column``, newest first (ties: larger value).

    The column holds ``[event_ts, value]``, or ``None`` for events the filter excludes.
    """

    def __init__(self, column: str, n: int) -> None:
        super().__init__(column=column)
        self.n = n

    def result(self, items: Iterable[Any]) -> list[list[Any]]:
        pairs = [tuple(p) for p in items if p is not None]
        pairs.sort(reverse=True)
        return [list(p) for p in pairs[:self.n]]


# -- the application ---------------------------------------------------------------------


def aggregator_of(feature: PeerFeature) -> Any:
    """The Quix aggregator (or collector) of ``feature``'s column."""
    kind, col, p = feature.aggregation, feature.name, feature.params
    if kind == "count":
        return qagg.Count(column=col)
    simple = {"sum": qagg.Sum, "mean": qagg.Mean, "min": qagg.Min, "max": qagg.Max}
    if kind in simple:
        return simple[kind](column=col)
    if kind == "approx_distinct":
        return HllDistinct(col, int(p.get("lg_k", 12)))
    if kind == "approx_quantile":
        return KllQuantile(col, int(p.get("k", 200)), float(p.get("quantile", 0.5)))
    if kind == "last_n":
        return LastN(col, int(p["n"]))
    raise ValueError(f"feature {feature.name!r}: aggregation {kind!r} has no Quix peer")


@dataclass(frozen=True)
class PeerConfig:
    """What the peer application computes and how it is run."""

    bootstrap: str
    topic: str
    key_field: str
    features: tuple[PeerFeature, ...]
    block_sizes: tuple[int, ...]
    grace_ms: int
    regroup_grace_ms: int
    state_dir: str
    sample: dict[str, list[str]]
    commit_interval_s: float = 5.0

    @property
    def entities(self) -> dict[str, list[PeerFeature]]:
        """Features by entity field, in first-use order."""
        out: dict[str, list[PeerFeature]] = {}
        for f in self.features:
            out.setdefault(f.entity, []).append(f)
        return out

    @property
    def topics_per_event(self) -> int:
        """Messages processed per event: the input one plus one per repartition."""
        return 1 + sum(1 for e in self.entities if e != self.key_field)


@dataclass(frozen=True)
class PeerWindow:
    """One tumbling window of the application: its store and its aggregators by column."""

    entity_type: str
    size: int
    store: str
    aggregators: dict[str, Any]


class WindowSink:
    """Keeps the windows of the sampled entities: closed ones as emitted, open ones at the end."""

    def __init__(self, sample: dict[str, list[str]]) -> None:
        self.sample = {etype: set(ids) for etype, ids in sample.items()}
        self.kept: list[list[Any]] = []
        self.closed: Counter[str] = Counter()
        self.late = 0

    def for_window(self, entity_type: str, size: int) -> Callable[..., None]:
        """The ``update(..., metadata=True)`` callback of one (entity type, size) window."""
        wanted = self.sample.get(entity_type, set())
        label = f"{entity_type}/{size}"

        def sink(value: dict, key: Any, timestamp: int, headers: Any) -> None:
            self.closed[label] += 1
            entity = key.decode() if isinstance(key, bytes) else key
            if entity in wanted:
                features = {k: v for k, v in value.items() if k not in ("start", "end")}
                self.kept.append([entity_type, entity, value["start"], size, features])
        return sink

    def on_late(self, *args: Any) -> bool:
        """Count a message Quix dropped as late (and do not log it)."""
        self.late += 1
        return False


def build_app(config: PeerConfig, sink: WindowSink, on_processed: Callable[[str, int, int], None]
              ) -> tuple[Any, list[PeerWindow]]:
    """Return the Quix app computing ``config.features`` into ``sink``, and its windows."""
    from quixstreams import Application

    app = Application(
        broker_address=config.bootstrap, consumer_group=f"bench-quix-{os.getpid()}",
        auto_offset_reset="earliest", state_dir=config.state_dir, use_changelog_topics=False,
        commit_interval=config.commit_interval_s,
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
        rocksdb_options=_rocksdb_options(), on_message_processed=on_processed,
        loglevel="WARNING",
    )
    topic = app.topic(
        config.topic, key_deserializer="bytes",
        value_deserializer=ConfluentAvroDeserializer(VIEWS_SCHEMA, _schema_id(config.topic)),
        timestamp_extractor=lambda value, headers, ts, ts_type: value["event_ts"],
    )
    sdf = app.dataframe(topic)
    windows = []
    for entity, feats in config.entities.items():
        branch, grace, closing = sdf, config.grace_ms, "partition"
        if entity != config.key_field:
            fields = tuple(dict.fromkeys(r for f in feats for r in (entity, *f.reads)))
            branch = sdf.apply(lambda e, keep=fields: {k: e[k] for k in keep})
            branch = branch.group_by(entity, name=f"by_{entity}")
            # the grace covers the replay: nothing closes by partition time, and closing by
            # key spares the scans of every key that partition closing does at each boundary
            grace, closing = config.regroup_grace_ms, "key"
        branch = branch.apply(lambda e, fs=tuple(feats): {f.name: f.column(e) for f in fs})
        etype = entity.removesuffix("_id")
        for size in config.block_sizes:
            aggs = {f.name: aggregator_of(f) for f in feats}
            window = branch.tumbling_window(
                size, grace_ms=grace, name=f"{etype}_{size}", on_late=sink.on_late).agg(**aggs)
            closed = window.final(closing_strategy=closing)
            closed.update(sink.for_window(etype, size), metadata=True)
            windows.append(PeerWindow(etype, size, window.name, aggs))
    return app, windows


def _rocksdb_options() -> Any:
    from quixstreams.state.rocksdb import RocksDBOptions

    # sketch states are bytes, which JSON (the default) cannot hold
    return RocksDBOptions(dumps=pickle.dumps, loads=pickle.loads)


def _schema_id(topic: str) -> int:
    from schemas.registry import schema_id_for_topic

    return schema_id_for_topic(topic)


# -- open windows at the end of the input ---------------------------------------------------


def read_open_windows(state_dir: str, windows: Sequence[PeerWindow],
                      sample: dict[str, list[str]], raw_key_type: str) -> list[list[Any]]:
    """The windows of the sampled entities still open in the state stores, with their results.

    Run after the application stopped. Quix keys its window state by the message key: the
    raw bytes for ``raw_key_type`` entities (the input topic's key), the serialized key after
    a ``group_by``. An aggregator's state is at ``"<column>/<state_suffix>"``; a collector's
    items are kept per message in the collection.
    """
    from quixstreams.state.rocksdb.windowed.partition import WindowedRocksDBStorePartition

    out: list[list[Any]] = []
    for w in windows:
        ids = sample.get(w.entity_type, [])
        if not ids:
            continue
        prefixes = {(i.encode() if w.entity_type == raw_key_type else pickle.dumps(i)): i
                    for i in ids}
        for path in sorted(Path(state_dir).glob(f"*/{w.store}/*/*")):
            part = WindowedRocksDBStorePartition(str(path), options=_rocksdb_options())
            try:
                tx = part.begin()
                for prefix, entity in prefixes.items():
                    for (start, end), state, _ in tx.iter_windows(prefix):
                        items = tx.get_from_collection(start, end, prefix=prefix)
                        out.append([w.entity_type, entity, start, w.size,
                                    _window_results(w.aggregators, state, items)])
            finally:
                part.close()
    return out


def _window_results(aggregators: dict[str, Any], state: dict[str, Any] | None,
                    items: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for column, agg in aggregators.items():
        if isinstance(agg, qagg.BaseCollector):
            out[column] = agg.result([item[agg.column] for item in items])
        else:
            value = (state or {}).get(f"{column}/{agg.state_suffix}", agg.initialize())
            out[column] = agg.result(value)
    return out


# -- worker ------------------------------------------------------------------------------


def run_worker(args: dict) -> dict:
    """Run the peer until every message is processed; return timings, write sampled windows.

    ``args``: ``bootstrap``, ``features`` (path), ``n`` (events in ``views``),
    ``state_dir``, ``out`` (path for the sampled windows, JSON), ``sample``,
    ``grace_ms``, ``regroup_grace_ms``, ``t_launch``.
    """
    from features.spec_loader import load_features

    specs = load_features(args["features"]).for_source("views")
    block_sizes = {s.block_sizes for s in specs}
    if len(block_sizes) != 1:
        raise ValueError(f"the peer needs one block_sizes list for all views features, "
                         f"got {sorted(block_sizes)}")
    config = PeerConfig(
        bootstrap=args["bootstrap"], topic="views", key_field="item_id",
        features=tuple(PeerFeature.from_spec(s) for s in specs),
        block_sizes=block_sizes.pop(), grace_ms=args["grace_ms"],
        regroup_grace_ms=args["regroup_grace_ms"], state_dir=args["state_dir"],
        sample=args["sample"],
    )
    expected = args["n"] * config.topics_per_event
    sink = WindowSink(config.sample)
    state: dict[str, Any] = {"count": 0, "events": 0, "first": None}
    app: Any = None

    def on_processed(topic: str, partition: int, offset: int) -> None:
        if state["count"] == 0:
            state["first"] = time.time()
        state["count"] += 1
        state["events"] += topic == config.topic
        if state["count"] >= expected:
            app.stop()

    app, windows = build_app(config, sink, on_processed)
    t_ready = time.time()
    app.run()
    t_end = time.time()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    still_open = read_open_windows(config.state_dir, windows, config.sample,
                                   config.key_field.removesuffix("_id"))
    Path(args["out"]).write_text(json.dumps({"windows": sink.kept + still_open,
                                             "closed": sink.closed}))
    t0 = args["t_launch"]
    return {
        "startup_s": t_ready - t0,
        "first_data_s": (state["first"] - t0) if state["first"] else None,
        "wall_s": t_end - t0, "events": state["events"], "messages": state["count"],
        "late": sink.late, "closed_windows": sum(sink.closed.values()),
        "open_windows_read": len(still_open), "peak_rss_mb": rss,
    }
