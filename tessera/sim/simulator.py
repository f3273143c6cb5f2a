"""A closed-loop simulator: synthetic users ask the serving endpoint for feeds and react.

Each tick, ``users_per_tick`` users of a synthetic ``World`` (drawn by activity) request a
feed page over HTTP like real clients. Every served item is viewed (a ``views`` event with
a dwell time drawn from the world, produced to Kafka as columnar batch envelopes, one batch
per partition per tick) and engaged with according to the user's hidden affinity and the
position bias (``World.engagement_probabilities``); engagements go through
``POST /v1/events``, one list per feed request, so they take the same path as real traffic.

Users are split deterministically between two arms: ``crc32(user_id) % 100 <
popularity_share * 100`` puts a user in the ``baseline`` arm, whose requests carry
``X-Tessera-Ranker: popularity``; everyone else is in the ``model`` arm. The report counts
requests, impressions, actions, CTR (clicks / impressions), errors and client-side latency
per arm and per L2 model version as returned by the server.

Randomness: the users of tick ``t`` come from ``default_rng([seed, t])`` and the reactions
of request ``k`` of tick ``t`` from ``default_rng([seed, t, k])``, so a run is reproducible
for the same served pages whatever the thread scheduling.
"""

from __future__ import annotations

import math
import threading
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from features.errors import TesseraError
from tessera.synth.world import ACTIONS, SURFACES, World, WorldConfig

Arm = Literal["model", "baseline"]
ARMS: tuple[Arm, ...] = ("model", "baseline")
RANKER_HEADER = "X-Tessera-Ranker"
UNKNOWN_VERSION = "unknown"
"""Version key of a response without ``model_versions.l2``."""


class SimulatorError(TesseraError):
    """Base class of every error the simulator raises on purpose."""


class SimulatorConfigError(SimulatorError, ValueError):
    """A ``SimulatorConfig`` parameter is out of range; the message names it and a fix."""

    def __init__(self, parameter: str, expected: str, value: Any, fix: str = ""):
        self.parameter = parameter
        msg = f"SimulatorConfig.{parameter} must be {expected}, got {value!r}"
        super().__init__(f"{msg}; {fix}" if fix else msg)


# ---------------------------------------------------------------------- config


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True, kw_only=True)
class SimulatorConfig:
    """What a simulation talks to, how much traffic it makes, and the world it plays.

    Args:
        base_url: the serving endpoint, e.g. ``http://127.0.0.1:8000``.
        bootstrap: Kafka bootstrap servers for ``views`` events; None sends no views.
        world: the synthetic world whose users play (use the world the store was fed from,
            so item ids ``i<k>`` map back to its items).
        users_per_tick: feed requests per tick (users drawn by activity, with repeats).
        tick_s: wall seconds from the start of one tick to the start of the next.
        time_scale: simulated seconds per wall second; the world's impression-to-engagement
            delays are divided by it (event times are real wall-clock times).
        limit: items asked for per feed request.
        popularity_share: share of users (by ``crc32(user_id) % 100``) in the baseline arm.
        seed: seed of every random draw of the simulator (not of the world).
        max_requests: stop after this many feed requests; None for no limit.
        request_timeout_s: HTTP timeout of each request.
        concurrency: feed requests in flight at once (threads sharing one keep-alive client).
        max_engagement_delay_ms: cap on ``event_ts - view time`` of an engagement.
        api_key: sent as ``X-API-Key`` when the server requires keys.
        views_topic: Kafka topic of view events.
    """

    base_url: str
    bootstrap: str | None = None
    world: WorldConfig = field(default_factory=WorldConfig)
    users_per_tick: int = 10
    tick_s: float = 1.0
    time_scale: float = 60.0
    limit: int = 20
    popularity_share: float = 0.0
    seed: int = 0
    max_requests: int | None = None
    request_timeout_s: float = 5.0
    concurrency: int = 4
    max_engagement_delay_ms: int = 60_000
    api_key: str | None = None
    views_topic: str = "views"

    def __post_init__(self) -> None:
        if not isinstance(self.base_url, str) or not self.base_url.startswith(
            ("http://", "https://")
        ):
            raise SimulatorConfigError(
                "base_url", "an http(s) URL", self.base_url, "use e.g. http://127.0.0.1:8000"
            )
        if self.bootstrap is not None and (not isinstance(self.bootstrap, str) or not self.bootstrap):
            raise SimulatorConfigError("bootstrap", "None or HOST:PORT[,...]", self.bootstrap)
        if not isinstance(self.world, WorldConfig):
            raise SimulatorConfigError("world", "a WorldConfig", self.world)
        for name, minimum in (("users_per_tick", 1), ("limit", 1), ("seed", 0),
                              ("concurrency", 1), ("max_engagement_delay_ms", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < minimum:
                raise SimulatorConfigError(name, f"an integer >= {minimum}", v)
        if self.max_requests is not None and (not _is_int(self.max_requests)
                                              or self.max_requests < 1):
            raise SimulatorConfigError("max_requests", "None or an integer >= 1", self.max_requests)
        for name in ("tick_s", "time_scale", "request_timeout_s"):
            v = getattr(self, name)
            if not _is_number(v) or v <= 0:
                raise SimulatorConfigError(name, "a finite number > 0", v)
        if not _is_number(self.popularity_share) or not 0 <= self.popularity_share <= 1:
            raise SimulatorConfigError(
                "popularity_share", "a number in [0, 1]", self.popularity_share,
                "0.5 sends half of the users to the popularity baseline",
            )
        if not isinstance(self.views_topic, str) or not self.views_topic:
            raise SimulatorConfigError("views_topic", "a non-empty string", self.views_topic)


def arm_of(user_id: str, popularity_share: float) -> Arm:
    """Return the arm of ``user_id``: ``baseline`` when ``crc32 % 100 < share * 100``."""
    bucket = zlib.crc32(user_id.encode("utf-8")) % 100
    return "baseline" if bucket < popularity_share * 100 else "model"


def item_index(item_id: Any, n_items: int) -> int | None:
    """Return the world item number of ``item_id`` (``"i<k>"``), or None if it is not one."""
    if not isinstance(item_id, str) or not item_id.startswith("i"):
        return None
    digits = item_id[1:]
    if not digits.isdigit() or str(int(digits)) != digits:
        return None
    k = int(digits)
    return k if k < n_items else None


# ---------------------------------------------------------------------- accounting


@dataclass
class Stats:
    """Counters of one arm or one model version."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    impressions: int = 0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    engagements_sent: int = 0
    engagement_errors: int = 0
    latencies_ms: list[float] = field(default_factory=list)

    @property
    def clicks(self) -> int:
        return self.actions["click"]

    @property
    def ctr(self) -> float | None:
        """Clicks per impression; None before the first impression."""
        return self.clicks / self.impressions if self.impressions else None

    def rate(self, action: str) -> float | None:
        """``action`` events per impression; None before the first impression."""
        return self.actions[action] / self.impressions if self.impressions else None

    def latency_ms(self, q: float) -> float | None:
        """The ``q``-th percentile (0..100) of client-side feed latency; None if no request."""
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else None

    def to_dict(self) -> dict[str, Any]:
        """Return the counters and derived rates as plain JSON-able values."""
        return {
            "requests": self.requests, "errors": self.errors, "timeouts": self.timeouts,
            "impressions": self.impressions, "actions": dict(self.actions),
            "ctr": self.ctr, "rates": {a: self.rate(a) for a in ACTIONS},
            "engagements_sent": self.engagements_sent,
            "engagement_errors": self.engagement_errors,
            "latency_ms": {"p50": self.latency_ms(50), "p99": self.latency_ms(99)},
        }


@dataclass
class Outcome:
    """What one simulated feed request produced (built on a worker thread)."""

    user_id: str
    arm: Arm
    ok: bool
    latency_ms: float
    version: str | None = None
    model_versions: dict[str, str] = field(default_factory=dict)
    impressions: int = 0
    actions: dict[str, int] = field(default_factory=lambda: dict.fromkeys(ACTIONS, 0))
    views: list[dict[str, Any]] = field(default_factory=list)
    engagements_sent: int = 0
    engagement_error: str | None = None
    error: str | None = None
    timeout: bool = False


@dataclass
class TickStats:
    """One tick, as given to the ``progress`` callback."""

    tick: int
    requests: int
    errors: int
    impressions: int
    clicks: int
    views_sent: int
    elapsed_s: float


@dataclass
class SimReport:
    """Counters of a run per arm and per L2 model version, plus run totals.

    Failed feed requests have no version: they count in ``by_arm`` only.
    """

    by_arm: dict[str, Stats] = field(default_factory=lambda: {a: Stats() for a in ARMS})
    by_version: dict[str, Stats] = field(default_factory=dict)
    model_versions: dict[str, dict[str, str]] = field(default_factory=dict)
    ticks: int = 0
    elapsed_s: float = 0.0
    views_sent: int = 0
    views_delivered: int = 0
    error_samples: list[str] = field(default_factory=list)

    @property
    def total(self) -> Stats:
        """The sum over arms."""
        out = Stats()
        for s in self.by_arm.values():
            _merge(out, s)
        return out

    def add(self, o: Outcome) -> None:
        """Count one request's outcome."""
        targets = [self.by_arm[o.arm]]
        if o.ok:
            key = o.version or UNKNOWN_VERSION
            targets.append(self.by_version.setdefault(key, Stats()))
            self.model_versions.setdefault(key, dict(o.model_versions))
        for s in targets:
            s.requests += 1
            s.latencies_ms.append(o.latency_ms)
            if not o.ok:
                s.errors += 1
                s.timeouts += int(o.timeout)
                continue
            s.impressions += o.impressions
            for a, n in o.actions.items():
                s.actions[a] += n
            s.engagements_sent += o.engagements_sent
            s.engagement_errors += int(o.engagement_error is not None)
        for msg in (o.error, o.engagement_error):
            if msg and len(self.error_samples) < 10:
                self.error_samples.append(msg)

    def to_dict(self) -> dict[str, Any]:
        """Return the whole report as plain JSON-able values."""
        return {
            "ticks": self.ticks, "elapsed_s": round(self.elapsed_s, 3),
            "views_sent": self.views_sent, "views_delivered": self.views_delivered,
            "total": self.total.to_dict(),
            "by_arm": {k: v.to_dict() for k, v in self.by_arm.items() if v.requests},
            "by_version": {k: v.to_dict() for k, v in sorted(self.by_version.items())},
            "model_versions": self.model_versions,
            "error_samples": list(self.error_samples),
        }

    def table(self) -> str:
        """Return a readable table: one row per arm, one per L2 version, and the total."""
        head = ("group", "requests", "errors", "impressions", "clicks", "CTR", "likes",
                "hides", "p50 ms", "p99 ms")
        rows: list[tuple[str, ...]] = [head]

        def fmt(v: float | None, spec: str) -> str:
            return "-" if v is None else format(v, spec)

        def row(name: str, s: Stats) -> tuple[str, ...]:
            return (name, str(s.requests), str(s.errors), str(s.impressions), str(s.clicks),
                    fmt(s.ctr, ".4f"), str(s.actions["like"]), str(s.actions["hide"]),
                    fmt(s.latency_ms(50), ".1f"), fmt(s.latency_ms(99), ".1f"))

        rows += [row(f"arm={k}", v) for k, v in self.by_arm.items() if v.requests]
        rows += [row(f"l2={k}", v) for k, v in sorted(self.by_version.items())]
        rows.append(row("total", self.total))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(r, widths, strict=True)))
                 for r in rows]
        lines.append(f"ticks={self.ticks} elapsed_s={self.elapsed_s:.1f} "
                     f"views_sent={self.views_sent} views_delivered={self.views_delivered}")
        return "\n".join(lines)


def _merge(into: Stats, s: Stats) -> None:
    into.requests += s.requests
    into.errors += s.errors
    into.timeouts += s.timeouts
    into.impressions += s.impressions
    for a, n in s.actions.items():
        into.actions[a] += n
    into.engagements_sent += s.engagements_sent
    into.engagement_errors += s.engagement_errors
    into.latencies_ms.extend(s.latencies_ms)


# ---------------------------------------------------------------------- view sinks


class ViewSink(Protocol):
    """Where view records go: ``send`` a tick's records, ``flush`` returns delivered count."""

    def send(self, records: Sequence[Mapping[str, Any]]) -> None: ...

    def flush(self, timeout_s: float) -> int: ...

    def close(self) -> None: ...


class KafkaViewSink:
    """Produce view records as columnar batch envelopes, one per partition per ``send``.

    Partition: ``crc32(user_id) % n_partitions``, as the generator does, so one user's views
    stay in order in one partition.
    """

    def __init__(self, bootstrap: str, topic: str = "views"):
        from confluent_kafka import Producer  # type: ignore[import-untyped]

        from tessera.topics import list_topics, producer_config

        known = list_topics(bootstrap)
        if topic not in known:
            raise SimulatorError(
                f"topic {topic!r} does not exist at {bootstrap}; create it with "
                f"`tessera topics create {topic}`"
            )
        self.topic = topic
        self.n_partitions = known[topic]
        self.producer = Producer(producer_config(bootstrap))
        self.delivered = 0
        self.errors: list[str] = []
        self._lock = threading.Lock()

    def _on_delivery(self, err: Any, msg: Any, n: int) -> None:
        with self._lock:
            if err is None:
                self.delivered += n
            elif len(self.errors) < 10:
                self.errors.append(f"{msg.topic()}[{msg.partition()}]: {err}")

    def send(self, records: Sequence[Mapping[str, Any]]) -> None:
        from schemas.columnar import encode_batch, records_to_columns
        from tessera.synth.sinks import compact, partitions_of

        if not records:
            return
        cols = records_to_columns("views", list(records))
        part = partitions_of(cols.columns["user_id"], self.n_partitions)  # type: ignore[arg-type]
        for p in np.unique(part).tolist():
            rows = np.flatnonzero(part == p)
            value = encode_batch(compact(cols.take(rows)))
            n = len(rows)
            while True:
                try:
                    self.producer.produce(
                        self.topic, value=value, partition=p,
                        on_delivery=lambda err, msg, n=n: self._on_delivery(err, msg, n),
                    )
                    break
                except BufferError:
                    self.producer.poll(0.05)
        self.producer.poll(0)

    def flush(self, timeout_s: float) -> int:
        remaining = self.producer.flush(timeout_s)
        if remaining:
            raise SimulatorError(f"{remaining} view batches were not delivered within "
                                 f"{timeout_s:g} s")
        if self.errors:
            raise SimulatorError("view delivery failed: " + "; ".join(self.errors))
        return self.delivered

    def close(self) -> None:
        self.producer.flush(5)


# ---------------------------------------------------------------------- simulator


def _now_ms() -> int:
    return int(time.time() * 1000)


class Simulator:
    """Play a world's users against a serving endpoint; see the module docstring.

    Use as a context manager (or call ``close``): it holds a keep-alive HTTP client, a
    thread pool and, with ``bootstrap``, a Kafka producer.

    Args:
        config: the simulation.
        transport: an ``httpx`` transport to use instead of the network (tests).
        view_sink: where views go instead of Kafka (tests); default Kafka when
            ``config.bootstrap`` is set, else views are counted but not sent.
        now_ms: wall clock in epoch ms, for event times.
    """

    def __init__(
        self,
        config: SimulatorConfig,
        *,
        transport: Any = None,
        view_sink: ViewSink | None = None,
        now_ms: Callable[[], int] = _now_ms,
        world: World | None = None,
    ):
        import httpx

        if not isinstance(config, SimulatorConfig):
            raise TypeError(f"Simulator needs a SimulatorConfig, got {type(config).__name__}")
        self.config = config
        self.world = world if world is not None else World(config.world)
        if self.world.config != config.world:
            raise SimulatorError("the World given was not built from config.world")
        self.now_ms = now_ms
        headers = {"X-API-Key": config.api_key} if config.api_key else {}
        n = config.concurrency
        self.client = httpx.Client(
            base_url=config.base_url, timeout=config.request_timeout_s, headers=headers,
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
            transport=transport,
        )
        if view_sink is None and config.bootstrap is not None:
            view_sink = KafkaViewSink(config.bootstrap, config.views_topic)
        self.view_sink = view_sink
        self.pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="sim")
        self.report = SimReport()
        self.tick = 0
        self._surface_p = config.world.surfaces.as_probabilities()
        self._feed_types = [s.upper() for s in SURFACES]

    def __enter__(self) -> Simulator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the HTTP client, the threads and the producer."""
        self.pool.shutdown(wait=True)
        self.client.close()
        if self.view_sink is not None:
            self.view_sink.close()

    @property
    def requests_left(self) -> int | None:
        """Feed requests left before ``max_requests``; None when unlimited."""
        m = self.config.max_requests
        return None if m is None else max(0, m - self.report.total.requests)

    # ------------------------------------------------------------------ one request
    def _feed(self, tick: int, k: int, user: int, surface: int) -> Outcome:
        import httpx

        c, w = self.config, self.world
        user_id = str(w.user_ids[user])
        arm = arm_of(user_id, c.popularity_share)
        headers = {RANKER_HEADER: "popularity"} if arm == "baseline" else {}
        body = {"user_id": user_id, "feed_type": self._feed_types[surface], "limit": c.limit}
        t0 = time.perf_counter()
        try:
            resp = self.client.post("/v1/feed", json=body, headers=headers)
            latency = (time.perf_counter() - t0) * 1000
            if resp.status_code != 200:
                return Outcome(user_id, arm, False, latency,
                               error=f"feed {resp.status_code}: {resp.text[:200]}")
            data = resp.json()
            items = data["items"]
            request_id = data["request_id"]
            versions = dict(data.get("model_versions") or {})
        except httpx.TimeoutException as exc:
            return Outcome(user_id, arm, False, (time.perf_counter() - t0) * 1000,
                           error=f"feed timeout: {exc!r}", timeout=True)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return Outcome(user_id, arm, False, (time.perf_counter() - t0) * 1000,
                           error=f"feed failed: {exc!r}")
        out = Outcome(user_id, arm, True, latency, version=versions.get("l2"),
                      model_versions=versions, impressions=len(items))
        if items:
            self._react(out, np.random.default_rng([c.seed, tick, k]), user, surface,
                        request_id, items)
        return out

    def _react(self, out: Outcome, rng: np.random.Generator, user: int, surface: int,
               request_id: str, items: list[dict[str, Any]]) -> None:
        """View every served item and draw engagements; post them in one list."""
        import httpx

        w, c = self.world, self.config
        n = len(items)
        idx = [item_index(it.get("item_id"), c.world.n_items) for it in items]
        known = np.array([i is not None for i in idx], dtype=bool)
        item_num = np.array([0 if i is None else i for i in idx], dtype=np.int64)
        position = np.array([int(it.get("position", p)) for p, it in enumerate(items)],
                            dtype=np.int64)
        affinity = np.where(known, w.affinity(user, item_num), 0.0).astype(np.float32)
        dwell = w.dwell_ms(rng, affinity)
        acts = rng.random((n, len(ACTIONS))) < w.engagement_probabilities(affinity, position)
        acts[~known] = False  # items the world does not know are viewed, never engaged
        hide = acts[:, ACTIONS.index("hide")]
        acts[hide, : ACTIONS.index("hide")] = False  # a hidden item gets no positive action
        rows, action = np.nonzero(acts)
        delay = w.engagement_delay_ms(rng, len(rows)) / c.time_scale
        delay = np.clip(delay, 1, c.max_engagement_delay_ms).astype(np.int64)

        now = self.now_ms()
        surface_name = SURFACES[surface]
        for p, it in enumerate(items):
            out.views.append({
                "event_id": f"sv-{request_id}-{int(position[p])}",
                "event_ts": now,
                "user_id": out.user_id,
                "item_id": str(it["item_id"]),
                "author_id": str(it.get("author_id") or ""),
                "topic": str(w.topic_ids[w.item_topic[item_num[p]]]) if known[p] else "",
                "surface": surface_name,
                "dwell_ms": int(dwell[p]),
                "position": int(position[p]),
                "request_id": request_id,
            })
        events: list[dict[str, Any]] = []
        for r, a in zip(rows.tolist(), action.tolist(), strict=True):
            name = ACTIONS[a]
            out.actions[name] += 1
            it = items[r]
            events.append({
                "event_id": f"se-{request_id}-{int(position[r])}-{name}",
                "impression_id": it["impression_id"], "user_id": out.user_id,
                "item_id": str(it["item_id"]), "action": name,
                "event_ts": now + int(delay[len(events)]),
                "dwell_ms": int(dwell[r]) if name == "click" else 0,
            })
        if not events:
            return
        try:
            resp = self.client.post("/v1/events", json=events)
            if resp.status_code == 202:
                out.engagements_sent = len(events)
            else:
                out.engagement_error = f"events {resp.status_code}: {resp.text[:200]}"
        except httpx.HTTPError as exc:
            out.engagement_error = f"events failed: {exc!r}"

    # ------------------------------------------------------------------ ticks
    def step(self) -> TickStats:
        """Run one tick: draw users, serve them concurrently, send views; return its stats."""
        t0 = time.perf_counter()
        c = self.config
        n = c.users_per_tick
        left = self.requests_left
        if left is not None:
            n = min(n, left)
        rng = np.random.default_rng([c.seed, self.tick])
        users = self.world.sample_users(rng, n)
        surfaces = rng.choice(len(SURFACES), size=n, p=self._surface_p)
        futures = [self.pool.submit(self._feed, self.tick, k, int(u), int(s))
                   for k, (u, s) in enumerate(zip(users.tolist(), surfaces.tolist(), strict=True))]
        outcomes = [f.result() for f in futures]
        views: list[dict[str, Any]] = []
        for o in outcomes:
            self.report.add(o)
            views.extend(o.views)
        if views:
            self.report.views_sent += len(views)
            if self.view_sink is not None:
                self.view_sink.send(views)
        stats = TickStats(
            tick=self.tick, requests=len(outcomes),
            errors=sum(not o.ok for o in outcomes),
            impressions=sum(o.impressions for o in outcomes),
            clicks=sum(o.actions["click"] for o in outcomes),
            views_sent=len(views), elapsed_s=time.perf_counter() - t0,
        )
        self.tick += 1
        self.report.ticks += 1
        return stats

    def run(
        self,
        duration_s: float | None = None,
        stop_event: threading.Event | None = None,
        progress: Callable[[TickStats], None] | None = None,
        *,
        flush_timeout_s: float = 30.0,
    ) -> SimReport:
        """Run ticks every ``tick_s`` until ``duration_s``, ``stop_event`` or ``max_requests``.

        With none of the three, runs until interrupted. Views are flushed to Kafka at the end.

        Returns:
            The report of everything this simulator did so far.

        Raises:
            SimulatorError: views could not be delivered.
        """
        if duration_s is not None and (not _is_number(duration_s) or duration_s <= 0):
            raise SimulatorConfigError("run.duration_s", "None or a number > 0", duration_s)
        stop = stop_event or threading.Event()
        start = time.monotonic()
        next_tick = start
        try:
            while not stop.is_set():
                if duration_s is not None and time.monotonic() - start >= duration_s:
                    break
                if self.requests_left == 0:
                    break
                stats = self.step()
                if progress is not None:
                    progress(stats)
                next_tick += self.config.tick_s
                wait = next_tick - time.monotonic()
                if duration_s is not None:
                    wait = min(wait, start + duration_s - time.monotonic())
                if wait > 0 and self.requests_left != 0:
                    stop.wait(wait)
        finally:
            self.report.elapsed_s += time.monotonic() - start
            if self.view_sink is not None:
                self.report.views_delivered = self.view_sink.flush(flush_timeout_s)
        return self.report
