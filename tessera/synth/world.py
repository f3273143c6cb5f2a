"""The synthetic world: its configuration and the population built from it.

A ``World`` holds users with latent topic interests, authors with a home topic, and
items (author, topic, creation time, Zipf-like popularity, latent quality). It is fully
determined by ``WorldConfig.seed``; the event streams played over it live in
``tessera.synth.generate``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import Literal

import numpy as np

from tessera.synth.errors import WorldConfigError

SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

DEFAULT_START_TS = 1_793_491_200_000
"""2026-11-01T00:00:00Z in epoch milliseconds."""

Action = Literal["click", "like", "share", "save", "hide"]
ACTIONS: tuple[Action, ...] = ("click", "like", "share", "save", "hide")
"""Engagement actions, in the order of the Avro ``Action`` enum (the code is the index)."""

Surface = Literal["explore", "follow", "nearby"]
SURFACES: tuple[Surface, ...] = ("explore", "follow", "nearby")
"""Feed surfaces of views; impressions carry them upper-cased as ``feed_type``."""

_CANDIDATES = 8
"""Popularity-drawn candidates per view, re-weighted by affinity and freshness."""


def _check_fraction(name: str, value: float, *, open_top: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or value > 1 or (open_top and value >= 1):
        rng = "[0, 1)" if open_top else "[0, 1]"
        raise WorldConfigError(name, f"a number in {rng}", value)


def _check_int(name: str, value: int, *, minimum: int, fix: str = "") -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise WorldConfigError(name, f"an integer >= {minimum}", value, fix)


def _check_positive(name: str, value: float) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value <= 0:
        raise WorldConfigError(name, "a finite number > 0", value)


@dataclass(frozen=True, kw_only=True)
class EngagementRates:
    """Base probability of each action on one impression at position 0 and average affinity.

    Positive actions (click, like, share, save) grow with affinity; hide shrinks with it.
    All shrink with position (position bias).
    """

    click: float = 0.08
    like: float = 0.03
    share: float = 0.005
    save: float = 0.01
    hide: float = 0.01

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_fraction(f"engagement.{f.name}", getattr(self, f.name))

    def as_array(self) -> np.ndarray:
        """Return the rates as a float64 array in ``ACTIONS`` order."""
        return np.array([getattr(self, a) for a in ACTIONS], dtype=np.float64)


@dataclass(frozen=True, kw_only=True)
class DelayConfig:
    """Delay from an impression to an engagement on it: mostly minutes, a tail of hours to days.

    Fast delays are log-normal around ``median_ms``; a ``tail_fraction`` of engagements
    instead draws a log-normal delay around ``tail_median_ms``. All delays are capped at
    ``max_ms``.
    """

    median_ms: int = 20 * SECOND
    tail_fraction: float = 0.05
    tail_median_ms: int = 2 * HOUR
    max_ms: int = 3 * DAY

    def __post_init__(self) -> None:
        _check_int("delay.median_ms", self.median_ms, minimum=1)
        _check_fraction("delay.tail_fraction", self.tail_fraction)
        _check_int("delay.tail_median_ms", self.tail_median_ms, minimum=1)
        _check_int("delay.max_ms", self.max_ms, minimum=1)


@dataclass(frozen=True, kw_only=True)
class SurfaceMix:
    """Share of sessions on each feed surface; normalized, so only ratios matter.

    ``follow`` sessions show items of authors the user follows; ``explore`` and ``nearby``
    draw from the whole catalogue by popularity x affinity.
    """

    explore: float = 0.7
    follow: float = 0.2
    nearby: float = 0.1

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not v >= 0:
                raise WorldConfigError(f"surfaces.{f.name}", "a number >= 0", v)
        if self.explore + self.follow + self.nearby <= 0:
            raise WorldConfigError(
                "surfaces", "a mix with a positive total", self, "give explore a weight > 0"
            )

    def as_probabilities(self) -> np.ndarray:
        """Return the normalized probabilities in ``SURFACES`` order."""
        w = np.array([self.explore, self.follow, self.nearby], dtype=np.float64)
        return w / w.sum()


@dataclass(frozen=True, kw_only=True)
class WorldConfig:
    """Everything that determines a synthetic world and its event streams.

    The same config (seed included) always yields the same events, byte for byte.

    Args:
        seed: seed of every random draw.
        n_users, n_items, n_authors, n_topics: population sizes.
        start_ts: first event time (epoch ms UTC); default 2026-11-01T00:00:00Z.
        duration_ms: length of the simulated period; a whole number of minutes.
        total_views: exact number of views over the period (impressions are one per view;
            engagements and item events come on top).
        zipf_exponent: item popularity ~ rank ** -zipf_exponent.
        interest_concentration: Dirichlet alpha of user topic interests (small = focused).
        preexisting_item_fraction: share of items created before ``start_ts`` (at least one
            item always is, so early views have something to show).
        prehistory_ms: how far before ``start_ts`` pre-existing items may be created.
        freshness_ms: time constant of the freshness boost of new items.
        late_fraction: share of events emitted later than their event-time order.
        late_max_ms: the most a late event is displaced (in emission time).
        malformed_fraction: undecodable payloads injected per valid event, per topic.
        engagement: base action probabilities.
        delay: impression-to-engagement delay distribution.
        surfaces: mix of feed surfaces.
        diurnal_amplitude: traffic swing over the day, 0 (flat) to < 1.
        peak_hour_utc: hour of day (UTC) of peak traffic.
        mean_session_views: mean views per session (geometric).
        page_size: impressions per feed request; positions run 0..page_size-1.
        follows_per_user: authors each user follows.
        id_namespace: prefix of event, impression and request ids, so that streams of two
            worlds written to one broker never collide on ``event_id``.
        chunk_ms: event-time span of one generated chunk; ``None`` picks one giving about
            200,000 views per chunk (between one minute and six hours).
    """

    seed: int = 0
    n_users: int = 10_000
    n_items: int = 20_000
    n_authors: int = 1_000
    n_topics: int = 32
    start_ts: int = DEFAULT_START_TS
    duration_ms: int = 7 * DAY
    total_views: int = 200_000
    zipf_exponent: float = 1.1
    interest_concentration: float = 0.3
    preexisting_item_fraction: float = 0.3
    prehistory_ms: int = 30 * DAY
    freshness_ms: int = 2 * DAY
    late_fraction: float = 0.02
    late_max_ms: int = 10 * MINUTE
    malformed_fraction: float = 0.0
    engagement: EngagementRates = field(default_factory=EngagementRates)
    delay: DelayConfig = field(default_factory=DelayConfig)
    surfaces: SurfaceMix = field(default_factory=SurfaceMix)
    diurnal_amplitude: float = 0.6
    peak_hour_utc: float = 20.0
    mean_session_views: float = 12.0
    page_size: int = 10
    follows_per_user: int = 10
    id_namespace: str = ""
    chunk_ms: int | None = None

    def __post_init__(self) -> None:
        _check_int("seed", self.seed, minimum=0)
        _check_int("n_users", self.n_users, minimum=1)
        _check_int("n_items", self.n_items, minimum=1)
        _check_int("n_authors", self.n_authors, minimum=1)
        _check_int("n_topics", self.n_topics, minimum=1)
        _check_int("start_ts", self.start_ts, minimum=0)
        _check_int(
            "duration_ms", self.duration_ms, minimum=MINUTE, fix="use e.g. 86_400_000 for a day"
        )
        if self.duration_ms % MINUTE:
            raise WorldConfigError(
                "duration_ms",
                "a whole number of minutes (a multiple of 60000)",
                self.duration_ms,
                f"use {self.duration_ms - self.duration_ms % MINUTE or MINUTE}",
            )
        _check_int("total_views", self.total_views, minimum=0)
        _check_positive("zipf_exponent", self.zipf_exponent)
        _check_positive("interest_concentration", self.interest_concentration)
        _check_fraction("preexisting_item_fraction", self.preexisting_item_fraction)
        _check_int("prehistory_ms", self.prehistory_ms, minimum=1)
        _check_int("freshness_ms", self.freshness_ms, minimum=1)
        _check_fraction("late_fraction", self.late_fraction)
        _check_int("late_max_ms", self.late_max_ms, minimum=1)
        _check_fraction("malformed_fraction", self.malformed_fraction)
        for name, kind in (
            ("engagement", EngagementRates),
            ("delay", DelayConfig),
            ("surfaces", SurfaceMix),
        ):
            if not isinstance(getattr(self, name), kind):
                raise WorldConfigError(name, f"a {kind.__name__}", getattr(self, name))
        _check_fraction("diurnal_amplitude", self.diurnal_amplitude, open_top=True)
        if not isinstance(self.peak_hour_utc, (int, float)) or not 0 <= self.peak_hour_utc < 24:
            raise WorldConfigError("peak_hour_utc", "a number in [0, 24)", self.peak_hour_utc)
        if not isinstance(self.mean_session_views, (int, float)) or not (
            self.mean_session_views >= 1
        ):
            raise WorldConfigError("mean_session_views", "a number >= 1", self.mean_session_views)
        _check_int("page_size", self.page_size, minimum=1)
        _check_int("follows_per_user", self.follows_per_user, minimum=1)
        if not isinstance(self.id_namespace, str) or not self.id_namespace.isascii():
            raise WorldConfigError("id_namespace", "an ASCII string", self.id_namespace)
        if self.chunk_ms is not None:
            _check_int("chunk_ms", self.chunk_ms, minimum=MINUTE)
            if self.chunk_ms % MINUTE:
                raise WorldConfigError(
                    "chunk_ms", "a whole number of minutes (a multiple of 60000)", self.chunk_ms
                )

    @property
    def end_ts(self) -> int:
        """End of the simulated period (exclusive) for sessions; engagements may run past it."""
        return self.start_ts + self.duration_ms

    @property
    def views_per_day(self) -> float:
        """Average number of views per day."""
        return self.total_views * DAY / self.duration_ms

    @property
    def effective_chunk_ms(self) -> int:
        """The event-time span of one chunk (``chunk_ms`` or the automatic choice)."""
        if self.chunk_ms is not None:
            return min(self.chunk_ms, self.duration_ms)
        minutes = self.duration_ms // MINUTE
        per_chunk = round(minutes * 200_000 / max(self.total_views, 1))
        return min(max(per_chunk, 1), 360, minutes) * MINUTE


def _zipf_weights(rng: np.random.Generator, n: int, exponent: float) -> np.ndarray:
    """Return Zipf weights ``rank ** -exponent`` over randomly permuted ranks, summing to 1."""
    ranks = rng.permutation(n).astype(np.float64) + 1.0
    w = ranks**-exponent
    return w / w.sum()


def _near_one(s: float) -> bool:
    return abs(s - 1.0) < 1e-3  # treat as 1: the power form loses precision there


def _zipf_primitive(x: np.ndarray, s: float) -> np.ndarray:
    """An antiderivative of ``x ** -s``."""
    return np.log(x) if _near_one(s) else x ** (1.0 - s) / (1.0 - s)


def _zipf_rank_weights(n: int, s: float) -> np.ndarray:
    """Weights of ranks 0..n-1: the mass of ``x ** -s`` over ``[k + 1, k + 2)``, summing to 1.

    This is Zipf up to a smooth correction, chosen so that ``_zipf_sample_ranks`` can draw
    from it exactly in closed form (no search over a CDF).
    """
    edges = _zipf_primitive(np.arange(1, n + 2, dtype=np.float64), s)
    w = np.diff(edges)
    return w / w.sum()


def _zipf_sample_ranks(u: np.ndarray, n: int, s: float) -> np.ndarray:
    """Map uniforms ``u`` in [0, 1) to ranks 0..n-1 drawn from ``_zipf_rank_weights(n, s)``."""
    lo, hi = _zipf_primitive(np.float64(1.0), s), _zipf_primitive(np.float64(n + 1), s)
    y = lo + u * (hi - lo)
    x = np.exp(y) if _near_one(s) else (y * (1.0 - s)) ** (1.0 / (1.0 - s))
    return np.clip(np.floor(x).astype(np.int64) - 1, 0, n - 1)


def _cdf(weights: np.ndarray) -> np.ndarray:
    c = np.cumsum(weights, dtype=np.float64)
    return c / c[-1]


def _id_strings(prefix: str, n: int) -> np.ndarray:
    return np.array([f"{prefix}{i}" for i in range(n)], dtype=object)


class World:
    """A population of users, authors and items, built deterministically from a config.

    Attributes (numpy arrays, indexed by entity number; the id of user ``k`` is ``f"u{k}"``):
        user_interest: float32 (n_users, n_topics), rows sum to 1 (Dirichlet).
        user_activity: float64 (n_users,), share of sessions each user starts.
        user_follows: int32 (n_users, follows_per_user), followed authors.
        author_topic: int32 (n_authors,), home topic of each author.
        author_popularity: float64 (n_authors,), sums to 1.
        item_author, item_topic: int32 (n_items,).
        item_created_ts: int64 (n_items,), non-decreasing in the item number.
        item_popularity: float64 (n_items,), Zipf, sums to 1.
        item_quality: float32 (n_items,), in [0, 1].
    """

    def __init__(self, config: WorldConfig):
        if not isinstance(config, WorldConfig):
            raise TypeError(f"World needs a WorldConfig, got {type(config).__name__}")
        self.config = config
        world_seq, events_seq = np.random.SeedSequence(config.seed).spawn(2)
        self.events_seed: np.random.SeedSequence = events_seq
        rng = np.random.default_rng(world_seq)
        c = config

        # Topics have a popularity of their own: some categories are much bigger.
        topic_weight = _zipf_weights(rng, c.n_topics, 0.8)

        self.author_topic = rng.choice(c.n_topics, size=c.n_authors, p=topic_weight).astype(
            np.int32
        )
        self.author_popularity = _zipf_weights(rng, c.n_authors, 1.0)

        self.user_interest = rng.dirichlet(
            np.full(c.n_topics, c.interest_concentration), size=c.n_users
        ).astype(np.float32)
        # A Dirichlet row can underflow to all zeros for tiny alphas; keep rows usable.
        bad = ~np.isfinite(self.user_interest).all(axis=1) | (self.user_interest.sum(axis=1) <= 0)
        if bad.any():
            self.user_interest[bad] = 1.0 / c.n_topics
        self._interest_max = self.user_interest.max(axis=1)
        activity = rng.lognormal(0.0, 1.0, size=c.n_users)
        self.user_activity = activity / activity.sum()
        self._activity_cdf = _cdf(self.user_activity)
        self.user_follows = (
            np.searchsorted(
                _cdf(self.author_popularity), rng.random((c.n_users, c.follows_per_user)), "right"
            )
            .clip(0, c.n_authors - 1)
            .astype(np.int32)
        )

        self.item_author = (
            np.searchsorted(_cdf(self.author_popularity), rng.random(c.n_items), "right")
            .clip(0, c.n_authors - 1)
            .astype(np.int32)
        )
        off_topic = rng.random(c.n_items) < 0.2
        self.item_topic = np.where(
            off_topic, rng.integers(0, c.n_topics, c.n_items), self.author_topic[self.item_author]
        ).astype(np.int32)
        n_pre = max(1, round(c.preexisting_item_fraction * c.n_items))
        pre = rng.integers(c.start_ts - c.prehistory_ms, c.start_ts, n_pre)
        post = rng.integers(c.start_ts, c.end_ts, c.n_items - n_pre)
        self.item_created_ts = np.sort(np.concatenate([pre, post])).astype(np.int64)
        self.n_preexisting = n_pre
        self._pop_rank_to_item = rng.permutation(c.n_items)
        self.item_popularity = np.empty(c.n_items, dtype=np.float64)
        self.item_popularity[self._pop_rank_to_item] = _zipf_rank_weights(
            c.n_items, c.zipf_exponent
        )
        self.item_quality = rng.beta(2.0, 5.0, size=c.n_items).astype(np.float32)

        self._pre_cdf = _cdf(self.item_popularity[:n_pre])
        # Items grouped by author, by creation time within an author: author a's items are
        # _by_author[_author_off[a]:_author_off[a + 1]].
        self._by_author = np.lexsort((self.item_created_ts, self.item_author)).astype(np.int64)
        self._author_off = np.searchsorted(
            self.item_author[self._by_author], np.arange(c.n_authors + 1), "left"
        )
        self._ts_base = int(self.item_created_ts[0])
        self._ts_span = int(max(self.item_created_ts[-1], c.end_ts) - self._ts_base + 1)
        self._author_keys = self.item_author[self._by_author].astype(np.int64) * self._ts_span + (
            self.item_created_ts[self._by_author] - self._ts_base
        )

    # ----------------------------------------------------------------- entity ids
    @cached_property
    def user_ids(self) -> np.ndarray:
        """Object array of user ids (``"u0"``, ``"u1"``, ...)."""
        return _id_strings("u", self.config.n_users)

    @cached_property
    def item_ids(self) -> np.ndarray:
        """Object array of item ids (``"i0"``, ...); item numbers follow creation order."""
        return _id_strings("i", self.config.n_items)

    @cached_property
    def author_ids(self) -> np.ndarray:
        """Object array of author ids (``"a0"``, ...)."""
        return _id_strings("a", self.config.n_authors)

    @cached_property
    def topic_ids(self) -> np.ndarray:
        """Object array of topic ids (``"t0"``, ...)."""
        return _id_strings("t", self.config.n_topics)

    # ----------------------------------------------------------------- behaviour
    def affinity(self, user_idx: np.ndarray | int, item_idx: np.ndarray | int) -> np.ndarray:
        """Return how much users like items, in [0, 1], elementwise (arrays broadcast).

        ``0.75 * interest(user, topic(item)) / max interest(user) + 0.25 * quality(item)``:
        1 for a top-quality item in the user's favourite topic.
        """
        u = np.asarray(user_idx)
        i = np.asarray(item_idx)
        topic_match = self.user_interest[u, self.item_topic[i]] / self._interest_max[u]
        return (0.75 * topic_match + 0.25 * self.item_quality[i]).astype(np.float32)

    def dwell_ms(self, rng: np.random.Generator, affinity: np.ndarray) -> np.ndarray:
        """Draw view dwell times (int64 ms): log-normal, median 2 s at affinity 0 to 8 s at 1."""
        median = 2_000.0 * (1.0 + 3.0 * affinity.astype(np.float64))
        d = median * np.exp(0.7 * rng.standard_normal(affinity.shape))
        return np.clip(d, 150, 180_000).astype(np.int64)

    def engagement_probabilities(self, affinity: np.ndarray, position: np.ndarray) -> np.ndarray:
        """Return (n, 5) probabilities of each action in ``ACTIONS`` order for impressions.

        Positive actions scale with ``0.2 + 1.8 * affinity``, hide with ``1.8 - 1.6 *
        affinity``; all with the position bias ``(1 + position) ** -0.3``.
        """
        a = affinity.astype(np.float64)[:, None]
        bias = (1.0 + position.astype(np.float64))[:, None] ** -0.3
        scale = np.concatenate([np.repeat(0.2 + 1.8 * a, 4, axis=1), 1.8 - 1.6 * a], axis=1)
        return np.clip(self.config.engagement.as_array()[None, :] * scale * bias, 0.0, 1.0)

    def engagement_delay_ms(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` impression-to-engagement delays (int64 ms, >= 1)."""
        d = self.config.delay
        tail = rng.random(n) < d.tail_fraction
        median = np.where(tail, float(d.tail_median_ms), float(d.median_ms))
        sigma = np.where(tail, 1.5, 1.0)
        delay = median * np.exp(sigma * rng.standard_normal(n))
        return np.clip(delay, 1, d.max_ms).astype(np.int64)

    def sample_users(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """Draw ``n`` users (int64), proportionally to their activity."""
        cdf = self._activity_cdf
        return np.searchsorted(cdf, rng.random(n), "right").clip(0, self.config.n_users - 1)

    def sample_items(
        self,
        rng: np.random.Generator,
        users: np.ndarray,
        ts: np.ndarray,
        surfaces: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Pick one item per (user, time, surface) that exists at that time.

        ``explore``/``nearby``: draw candidates by popularity and keep one with probability
        proportional to affinity x freshness (popularity x affinity sampling by importance
        resampling). ``follow``: a random existing item of a random followed author, falling
        back to ``explore`` when that author has none yet.

        Returns:
            ``(items, followed)``: int64 item numbers, and a bool mask of the picks that came
            from a followed author.
        """
        n = len(users)
        items = np.empty(n, dtype=np.int64)
        followed = np.zeros(n, dtype=bool)
        follow = surfaces == SURFACES.index("follow")
        if follow.any():
            fi = np.flatnonzero(follow)
            slot = rng.integers(0, self.config.follows_per_user, len(fi))
            author = self.user_follows[users[fi], slot].astype(np.int64)
            keys = author * self._ts_span + (ts[fi] - self._ts_base)
            count = np.searchsorted(self._author_keys, keys, "right") - self._author_off[author]
            pick = self._author_off[author] + (rng.random(len(fi)) * np.maximum(count, 1)).astype(
                np.int64
            )
            ok = count > 0
            items[fi[ok]] = self._by_author[pick[ok]]
            followed[fi[ok]] = True
        rest = np.flatnonzero(~followed)
        if len(rest):
            items[rest] = self._sample_popular(rng, users[rest], ts[rest])
        return items, followed

    def _sample_popular(
        self, rng: np.random.Generator, users: np.ndarray, ts: np.ndarray
    ) -> np.ndarray:
        n = len(users)
        ranks = _zipf_sample_ranks(
            rng.random((n, _CANDIDATES)), self.config.n_items, self.config.zipf_exponent
        )
        cand = self._pop_rank_to_item[ranks]
        age = ts[:, None] - self.item_created_ts[cand]
        aff = self.affinity(users[:, None], cand).astype(np.float64)
        fresh = 0.3 + np.exp(-np.maximum(age, 0) / self.config.freshness_ms)
        w = (aff + 0.02) * fresh * (age >= 0)
        gumbel = -np.log(-np.log(rng.random((n, _CANDIDATES))))
        with np.errstate(divide="ignore"):
            score = np.log(w) + gumbel
        best = np.argmax(score, axis=1)
        out = cand[np.arange(n), best]
        none = ~(w > 0).any(axis=1)
        if none.any():  # no candidate existed yet: any pre-existing item, by popularity
            out[none] = np.searchsorted(self._pre_cdf, rng.random(int(none.sum())), "right").clip(
                0, self.n_preexisting - 1
            )
        return out

    def diurnal_rate(self, ts: np.ndarray) -> np.ndarray:
        """Relative traffic rate at epoch-ms times ``ts`` (mean 1 over a day)."""
        c = self.config
        hour = (np.asarray(ts, dtype=np.int64) % DAY) / HOUR
        return 1.0 + c.diurnal_amplitude * np.cos(2 * np.pi * (hour - c.peak_hour_utc) / 24.0)
