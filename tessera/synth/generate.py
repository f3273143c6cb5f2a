"""Play a ``World`` as event streams: columnar chunks of every topic, in emission order.

Time is cut into slices of ``WorldConfig.effective_chunk_ms``. Each slice gets its share of
the views (a multinomial draw over the diurnal traffic curve), starts sessions in it, and
expands them into requests (pages of ``page_size`` impressions), views and engagements.
Every event gets an *emission time*: its event time, or for a ``late_fraction`` of events a
time up to ``late_max_ms`` later. A chunk emits every pending event whose emission time is
before the slice end, sorted by emission time; events of later sessions can never come
before that, so each topic's emission order across chunks is sorted by emission time, and
only the late events are out of event-time order.

::

    slice k            slice k+1
    |--- sessions ---|--- sessions ---|
       imp  view view    eng (delay)      emitted in the chunk whose slice holds emit time
         \\____ late view ____/           (event_ts in slice k, emitted in slice k+1)

Three independent random streams (events, lateness, malformed payloads) keep the valid
events identical whatever ``late_fraction`` and ``malformed_fraction`` are.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from schemas.codec import encode
from schemas.columnar import DictColumn, EventColumns, columns_to_records
from schemas.registry import TOPICS, schema_id_for_topic
from tessera.synth.world import ACTIONS, MINUTE, SURFACES, World, WorldConfig

WATERMARK_BLOCK_MS = 5 * MINUTE
"""Bootstrap impressions carry ``feature_watermark = event_ts`` aligned down to this."""

BOOTSTRAP_MODEL_VERSIONS: dict[str, str] = {"l2": "bootstrap"}
FEED_TYPES: tuple[str, ...] = tuple(s.upper() for s in SURFACES)
SOURCES: tuple[str, ...] = ("popular", "following")
ITEM_OPS: tuple[str, ...] = ("created",)

EMIT_ORDER: tuple[str, ...] = ("items", "impressions", "views", "engagements")
"""Topics of a chunk, in the order sinks write them (an impression before its view)."""

MALFORMED_KINDS: tuple[str, ...] = ("truncated", "bad_magic", "garbage", "unknown_schema")

Raw = dict[str, np.ndarray]
"""Integer-coded events of one topic, before strings are made; always has seq, ts, emit, late."""


@dataclass(frozen=True)
class EventChunk:
    """Events emitted during one slice of time, per topic, in emission order.

    Attributes:
        index: chunk number, from 0.
        start_ts, end_ts: the slice ``[start_ts, end_ts)``: every event of the chunk has an
            emission time before ``end_ts`` (the last chunk flushes whatever is left, such
            as engagements delayed past the end of the period).
        columns: one ``EventColumns`` per topic (all four topics, maybe empty).
        malformed: undecodable payloads to write to each topic beside the valid events.
        late: number of late events (emitted after their event-time order) per topic.
    """

    index: int
    start_ts: int
    end_ts: int
    columns: Mapping[str, EventColumns]
    malformed: Mapping[str, tuple[bytes, ...]]
    late: Mapping[str, int]

    @property
    def n_events(self) -> int:
        """Valid events in the chunk, all topics."""
        return sum(c.n for c in self.columns.values())

    def records(self, topic: str) -> list[dict[str, Any]]:
        """Return the events of ``topic`` as Avro-ready dicts, in emission order."""
        return columns_to_records(self.columns[topic])


@dataclass
class GenerationSummary:
    """What a generation run produced (and, for a sink, wrote).

    Counts are per topic. ``min_event_ts``/``max_event_ts`` span the valid events.
    ``messages`` and ``bytes`` are filled by sinks that write messages.
    """

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    malformed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    late: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    messages: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(TOPICS, 0))
    min_event_ts: int | None = None
    max_event_ts: int | None = None
    chunks: int = 0
    elapsed_s: float = 0.0

    def add(self, chunk: EventChunk) -> None:
        """Count the events, late events and malformed payloads of ``chunk``."""
        self.chunks += 1
        for topic, cols in chunk.columns.items():
            self.counts[topic] = self.counts.get(topic, 0) + cols.n
            if cols.n:
                ts = cols.columns["event_ts"]
                lo, hi = int(ts.min()), int(ts.max())
                self.min_event_ts = lo if self.min_event_ts is None else min(self.min_event_ts, lo)
                self.max_event_ts = hi if self.max_event_ts is None else max(self.max_event_ts, hi)
        for topic, payloads in chunk.malformed.items():
            self.malformed[topic] = self.malformed.get(topic, 0) + len(payloads)
        for topic, n in chunk.late.items():
            self.late[topic] = self.late.get(topic, 0) + n

    @property
    def total_events(self) -> int:
        """Valid events, all topics."""
        return sum(self.counts.values())

    @property
    def total_malformed(self) -> int:
        return sum(self.malformed.values())

    @property
    def total_late(self) -> int:
        return sum(self.late.values())

    @property
    def events_per_s(self) -> float:
        """Valid events per second of wall time (0 when no time was measured)."""
        return self.total_events / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def table(self) -> str:
        """Render a plain-text summary table, one row per topic plus a total."""
        from features.timeutil import to_iso

        rows = [("topic", "events", "late", "malformed", "messages", "bytes")]
        for t in TOPICS:
            rows.append(
                (
                    t,
                    f"{self.counts.get(t, 0):,}",
                    f"{self.late.get(t, 0):,}",
                    f"{self.malformed.get(t, 0):,}",
                    f"{self.messages.get(t, 0):,}",
                    f"{self.bytes.get(t, 0):,}",
                )
            )
        rows.append(
            (
                "total",
                f"{self.total_events:,}",
                f"{self.total_late:,}",
                f"{self.total_malformed:,}",
                f"{sum(self.messages.values()):,}",
                f"{sum(self.bytes.values()):,}",
            )
        )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in rows
        ]
        lines.insert(1, "  ".join("-" * w for w in widths))
        lines.insert(-1, lines[1])
        if self.min_event_ts is not None and self.max_event_ts is not None:
            lines.append(f"event time: {to_iso(self.min_event_ts)} .. {to_iso(self.max_event_ts)}")
        if self.elapsed_s > 0:
            lines.append(
                f"{self.chunks} chunks in {self.elapsed_s:.2f} s: {self.events_per_s:,.0f} events/s"
            )
        return "\n".join(lines)


# ---------------------------------------------------------------- strings from integer ids


def _format_ids(prefix: str, numbers: np.ndarray) -> np.ndarray:
    out = np.empty(len(numbers), dtype=object)
    out[:] = [f"{prefix}{k}" for k in numbers.tolist()]
    return out


def _unique_ids(prefix: str, numbers: np.ndarray) -> DictColumn:
    """Dictionary column of ids that are all distinct (event ids): no sort needed."""
    return DictColumn(np.arange(len(numbers), dtype=np.int32), _format_ids(prefix, numbers))


def _entity_ids(numbers: np.ndarray, names: np.ndarray) -> DictColumn:
    """Dictionary column of entity ids; the dictionary holds only the ids that occur."""
    uniq, inv = np.unique(numbers, return_inverse=True)
    return DictColumn(inv.astype(np.int32).reshape(-1), names[uniq])


def _formatted_ids(prefix: str, numbers: np.ndarray) -> DictColumn:
    uniq, inv = np.unique(numbers, return_inverse=True)
    return DictColumn(inv.astype(np.int32).reshape(-1), _format_ids(prefix, uniq))


def _fixed(codes: np.ndarray, symbols: tuple[str, ...]) -> DictColumn:
    return DictColumn(codes.astype(np.int32), np.array(symbols, dtype=object))


def _maps(n: int, value: Mapping[str, Any]) -> np.ndarray:
    """Object array whose every row is the same (read-only by convention) dict."""
    out = np.empty(n, dtype=object)
    out.fill(dict(value))
    return out


class _Player:
    """The generation state of one run: random streams, counters and pending events."""

    def __init__(self, world: World):
        self.world = world
        self.config = c = world.config
        events_seq, late_seq, bad_seq = world.events_seed.spawn(3)
        self.rng = np.random.default_rng(events_seq)
        self.late_rng = np.random.default_rng(late_seq)
        self.bad_rng = np.random.default_rng(bad_seq)
        self.n_views = 0  # views so far; view k pairs with impression k
        self.n_requests = 0
        self.n_engagements = 0
        self.ns = c.id_namespace
        self.chunk_ms = c.effective_chunk_ms
        n_slices = -(-c.duration_ms // self.chunk_ms)
        self.bounds = [
            (c.start_ts + k * self.chunk_ms, min(c.start_ts + (k + 1) * self.chunk_ms, c.end_ts))
            for k in range(n_slices)
        ]
        # Views per slice: multinomial over the integral of the diurnal rate.
        minutes = c.start_ts + MINUTE * np.arange(c.duration_ms // MINUTE) + MINUTE // 2
        self.minute_rate = world.diurnal_rate(minutes)
        per_slice = np.add.reduceat(
            self.minute_rate, np.arange(0, len(minutes), self.chunk_ms // MINUTE)
        )
        self.quota = self.rng.multinomial(c.total_views, per_slice / per_slice.sum())
        items = np.arange(c.n_items, dtype=np.int64)
        self.pending: dict[str, Raw] = {t: {} for t in TOPICS}
        self.pending["items"] = self._with_emission(
            {"seq": items, "ts": world.item_created_ts.copy(), "item": items}
        )

    # ------------------------------------------------------------ one slice of sessions
    def _session_lengths(self, quota: int) -> np.ndarray:
        rng, mean = self.rng, self.config.mean_session_views
        parts: list[np.ndarray] = []
        need = quota
        while need > 0:
            lengths = rng.geometric(1.0 / mean, max(16, int(need / mean * 1.1) + 16))
            cs = np.cumsum(lengths)
            if cs[-1] >= need:
                cut = int(np.searchsorted(cs, need, "left"))
                lengths = lengths[: cut + 1].copy()
                lengths[-1] -= int(cs[cut]) - need
                parts.append(lengths)
                break
            parts.append(lengths)
            need -= int(cs[-1])
        return np.concatenate(parts) if parts else np.empty(0, np.int64)

    def play_slice(self, k: int) -> dict[str, Raw]:
        """Generate the sessions that start in slice ``k``; return new raw events per topic."""
        world, c, rng = self.world, self.config, self.rng
        lo, hi = self.bounds[k]
        lengths = self._session_lengths(int(self.quota[k]))
        n_sessions, n = len(lengths), int(lengths.sum())
        if n == 0:
            return {}
        # Session starts follow the diurnal rate inside the slice (minute resolution).
        m0 = (lo - c.start_ts) // MINUTE
        rate = self.minute_rate[m0 : m0 + (hi - lo) // MINUTE]
        minute = np.searchsorted(np.cumsum(rate) / rate.sum(), rng.random(n_sessions), "right")
        start = (
            lo + np.minimum(minute, len(rate) - 1) * MINUTE + rng.integers(0, MINUTE, n_sessions)
        )
        s_user = world.sample_users(rng, n_sessions)
        s_surface = np.searchsorted(
            np.cumsum(c.surfaces.as_probabilities()), rng.random(n_sessions), "right"
        ).clip(0, len(SURFACES) - 1)

        sess = np.repeat(np.arange(n_sessions), lengths)
        first = np.cumsum(lengths) - lengths
        j = np.arange(n) - first[sess]
        user = s_user[sess]
        surface = s_surface[sess]
        item, followed = world.sample_items(rng, user, start[sess], surface)
        aff = world.affinity(user, item)
        dwell = world.dwell_ms(rng, aff)
        step = dwell + 200 + rng.exponential(1_500.0, n).astype(np.int64)
        excl = np.cumsum(step) - step
        offset = excl - excl[first[sess]]
        position = j % c.page_size
        page_start = position == 0
        page = np.cumsum(page_start) - 1
        n_pages = int(page_start.sum())
        latency = rng.integers(50, 800, n_pages)
        served = (start[sess] + offset)[page_start]  # impression time of each page
        imp_ts = served[page]
        view_ts = imp_ts + latency[page] + (offset - offset[page_start][page])
        request = self.n_requests + page
        seq = self.n_views + np.arange(n, dtype=np.int64)
        self.n_requests += n_pages
        self.n_views += n

        probs = world.engagement_probabilities(aff, position)
        acts = rng.random(probs.shape) < probs
        hide = acts[:, ACTIONS.index("hide")]
        acts[hide, : ACTIONS.index("hide")] = False  # a hidden item gets no positive action
        rows, action = np.nonzero(acts)
        n_eng = len(rows)
        eng_ts = view_ts[rows] + world.engagement_delay_ms(rng, n_eng)
        eng_dwell = np.where(action == ACTIONS.index("click"), dwell[rows], 0)
        eng_seq = self.n_engagements + np.arange(n_eng, dtype=np.int64)
        self.n_engagements += n_eng

        common = {"user": user, "item": item, "surface": surface, "position": position}
        return {
            "impressions": self._with_emission(
                {"seq": seq, "ts": imp_ts, "request": request, "followed": followed, **common}
            ),
            "views": self._with_emission(
                {"seq": seq, "ts": view_ts, "request": request, "dwell": dwell, **common}
            ),
            "engagements": self._with_emission(
                {
                    "seq": eng_seq,
                    "ts": eng_ts,
                    "imp": seq[rows],
                    "user": user[rows],
                    "item": item[rows],
                    "action": action,
                    "dwell": eng_dwell,
                }
            ),
        }

    def _with_emission(self, raw: Raw) -> Raw:
        n = len(raw["ts"])
        late = self.late_rng.random(n) < self.config.late_fraction
        shift = self.late_rng.integers(1, self.config.late_max_ms + 1, n)
        raw["late"] = late
        raw["emit"] = raw["ts"] + np.where(late, shift, 0)
        return raw

    # ------------------------------------------------------------ emission
    def emit(self, new: dict[str, Raw], until: int | None) -> dict[str, Raw]:
        """Add ``new`` to the pending events; pop those with emission time < ``until``."""
        out: dict[str, Raw] = {}
        for topic in TOPICS:
            pend, add = self.pending[topic], new.get(topic)
            if add:
                pend = {k: np.concatenate([pend[k], add[k]]) for k in add} if pend else add
            if not pend:
                out[topic] = {}
                continue
            emit = pend["emit"]
            now = np.ones(len(emit), bool) if until is None else emit < until
            idx = np.flatnonzero(now)
            idx = idx[np.argsort(emit[idx], kind="stable")]
            out[topic] = {k: v[idx] for k, v in pend.items()}
            keep = np.flatnonzero(~now)
            self.pending[topic] = {k: v[keep] for k, v in pend.items()} if len(keep) else {}
        return out

    # ------------------------------------------------------------ columns
    def columns(self, topic: str, raw: Raw) -> EventColumns:
        """Build the ``EventColumns`` of ``topic`` (schema field order) from raw events."""
        w, ns = self.world, self.ns
        if not raw:
            raw = _EMPTY[topic]
        n = len(raw["ts"])
        ts = raw["ts"].astype(np.int64)
        item = raw["item"]
        if topic == "items":
            cols = {
                "event_id": _unique_ids(f"{ns}c", raw["seq"]),
                "event_ts": ts,
                "item_id": _entity_ids(item, w.item_ids),
                "author_id": _entity_ids(w.item_author[item], w.author_ids),
                "topic": _entity_ids(w.item_topic[item], w.topic_ids),
                "created_ts": ts.copy(),
                "op": _fixed(np.zeros(n, np.int32), ITEM_OPS),
            }
            return EventColumns(topic, n, cols)
        user_id = _entity_ids(raw["user"], w.user_ids)
        item_id = _entity_ids(item, w.item_ids)
        author_id = _entity_ids(w.item_author[item], w.author_ids)
        topic_id = _entity_ids(w.item_topic[item], w.topic_ids)
        if topic == "views":
            cols = {
                "event_id": _unique_ids(f"{ns}v", raw["seq"]),
                "event_ts": ts,
                "user_id": user_id,
                "item_id": item_id,
                "author_id": author_id,
                "topic": topic_id,
                "surface": _fixed(raw["surface"], SURFACES),
                "dwell_ms": raw["dwell"].astype(np.int64),
                "position": raw["position"].astype(np.int64),
                "request_id": _formatted_ids(f"{ns}r", raw["request"]),
            }
        elif topic == "impressions":
            imp_id = _unique_ids(f"{ns}imp", raw["seq"])
            cols = {
                "impression_id": imp_id,
                "event_id": imp_id,
                "event_ts": ts,
                "request_id": _formatted_ids(f"{ns}r", raw["request"]),
                "user_id": user_id,
                "item_id": item_id,
                "author_id": author_id,
                "topic": topic_id,
                "position": raw["position"].astype(np.int64),
                "feed_type": _fixed(raw["surface"], FEED_TYPES),
                "source": _fixed(raw["followed"].astype(np.int32), SOURCES),
                "model_versions": _maps(n, BOOTSTRAP_MODEL_VERSIONS),
                "scores": _maps(n, {}),
                "features": _maps(n, {}),
                "feature_watermark": ts - ts % WATERMARK_BLOCK_MS,
            }
        else:
            cols = {
                "event_id": _unique_ids(f"{ns}e", raw["seq"]),
                "event_ts": ts,
                "impression_id": _formatted_ids(f"{ns}imp", raw["imp"]),
                "user_id": user_id,
                "item_id": item_id,
                "author_id": author_id,
                "topic": topic_id,
                "action": _fixed(raw["action"], ACTIONS),
                "dwell_ms": raw["dwell"].astype(np.int64),
            }
        return EventColumns(topic, n, cols)

    # ------------------------------------------------------------ malformed payloads
    def malformed(self, topic: str, cols: EventColumns) -> tuple[bytes, ...]:
        """Draw undecodable payloads for ``topic``: about ``malformed_fraction`` per event."""
        f = self.config.malformed_fraction
        if f <= 0 or cols.n == 0:
            return ()
        rng = self.bad_rng
        k = int(rng.binomial(cols.n, f))
        out = []
        for _ in range(k):
            kind = MALFORMED_KINDS[int(rng.integers(len(MALFORMED_KINDS)))]
            if kind == "garbage":
                body = rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes()
                out.append(bytes([int(rng.integers(1, 256))]) + body)
                continue
            if kind == "unknown_schema":
                body = rng.integers(0, 256, int(rng.integers(0, 64)), dtype=np.uint8).tobytes()
                out.append(
                    b"\x00" + (900_000 + schema_id_for_topic(topic)).to_bytes(4, "big") + body
                )
                continue
            row = columns_to_records(cols.take([int(rng.integers(cols.n))]))[0]
            good = encode(topic, row)
            if kind == "truncated":
                out.append(good[: int(rng.integers(1, len(good)))])
            else:  # bad_magic
                out.append(bytes([int(rng.integers(1, 256))]) + good[1:])
        return tuple(out)


def _empty_raw(topic: str) -> Raw:
    e = np.empty(0, np.int64)
    keys = {
        "items": ("seq", "ts", "item"),
        "views": ("seq", "ts", "user", "item", "surface", "dwell", "position", "request"),
        "impressions": ("seq", "ts", "user", "item", "surface", "position", "request", "followed"),
        "engagements": ("seq", "ts", "imp", "user", "item", "action", "dwell"),
    }[topic]
    raw = {k: e for k in keys}
    raw["followed"] = np.empty(0, bool)
    return raw


_EMPTY: dict[str, Raw] = {t: _empty_raw(t) for t in TOPICS}


def generate_events(config: WorldConfig, *, world: World | None = None) -> Iterator[EventChunk]:
    """Generate the events of the world of ``config`` as chunks, in emission order.

    Deterministic: the same config always gives the same chunks. Within each topic the
    concatenated chunks are sorted by emission time, which equals event time except for
    the late events.

    Args:
        config: the world and stream parameters.
        world: a prebuilt ``World(config)`` to reuse (it must have been built from ``config``).

    Yields:
        ``EventChunk`` per slice of time (slices with no events are skipped), then a last
        chunk with everything still pending (engagements delayed past the period end).
    """
    if world is None:
        world = World(config)
    elif world.config != config:
        raise ValueError("world was built from another WorldConfig than the one given")
    player = _Player(world)
    n_slices = len(player.bounds)
    index = 0
    for k in range(n_slices + 1):
        if k < n_slices:
            lo, hi = player.bounds[k]
            raw = player.emit(player.play_slice(k), hi)
        else:
            lo, hi = player.bounds[-1][1], None
            raw = player.emit({}, None)
        if not any(raw[t] for t in TOPICS):
            continue
        columns = {t: player.columns(t, raw[t]) for t in EMIT_ORDER}
        late = {t: int(raw[t]["late"].sum()) if raw[t] else 0 for t in EMIT_ORDER}
        malformed = {t: player.malformed(t, columns[t]) for t in EMIT_ORDER}
        end = (
            hi
            if hi is not None
            else max([lo + 1] + [int(r["emit"].max()) + 1 for r in raw.values() if r])
        )
        yield EventChunk(index, lo, end, columns, malformed, late)
        index += 1


def summarize(config: WorldConfig) -> GenerationSummary:
    """Generate every event of ``config`` in memory, keep none, and return the counts."""
    summary = GenerationSummary()
    t0 = time.perf_counter()
    for chunk in generate_events(config):
        summary.add(chunk)
    summary.elapsed_s = time.perf_counter() - t0
    return summary
