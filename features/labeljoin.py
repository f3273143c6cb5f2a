"""Label join: each impression with its engagements in a label window, engine-agnostic.

An impression at time ``t`` is labelled by the engagements that point to it
(``impression_id``) and happened before ``t + label_window_ms``. Its training example is
emitted once the event-time watermark reaches ``t + label_window_ms``: every on-time
engagement that can label it has been seen by then. Labels are 0/1 per action
(click, like, share, save, hide), plus the delay to the first engagement.

The rules, per ``impression_id``:

* impressions: the first one seen wins; later copies are counted (``duplicate_impressions``);
* engagements: an ``event_id`` counts once (``duplicate_engagements``); an engagement at or
  after the window end is ignored for labels (``late_labels``); one stamped before its
  impression (client clock skew) labels it, with delay 0;
* engagements seen before their impression wait in the state (``pending``) until it comes;
  if the watermark passes ``engagement ts + label_window_ms + lateness_ms`` first, they are
  dropped and counted (``orphans_dropped``). This bound is conservative: an on-time
  impression always arrives before the watermark passes its own time;
* after an example is emitted its id is remembered (a tombstone) until the watermark passes
  ``t + label_window_ms + lateness_ms``, so a late copy of the impression is not emitted
  twice and a late engagement is counted (``after_emit``), not turned into an orphan.

Which events are on time is decided upstream, per source partition (``classify_late``), as
for blocks; the flow feeds only on-time events, so the examples do not depend on batching,
worker count or timing, except ``matured_at`` (the watermark seen at emission).

Order of calls on ``LabelJoin``: ``add_impression``/``add_engagement`` (or ``add_columns``)
any number of times, ``advance(part, watermark)`` as partition watermarks move, ``flush()``
to take the matured examples. Only ``snapshot()`` (plain dicts) is persisted for recovery.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from features.offline.training import LABEL_ACTIONS, label_column
from features.watermarks import NO_WATERMARK, combined_watermark
from schemas.columnar import EventColumns

__all__ = [
    "IMPRESSION_FIELDS",
    "LABEL_ACTIONS",
    "NO_WATERMARK",
    "LabelJoin",
    "LabelJoinConfig",
    "LabelJoinState",
    "join_reference",
    "make_example",
]

IMPRESSION_FIELDS: tuple[str, ...] = (
    "impression_id", "request_id", "user_id", "item_id", "author_id", "topic", "position",
    "feed_type", "source", "event_ts", "feature_watermark", "model_versions", "scores",
    "features",
)
"""Impression fields copied into a training example."""
_ENGAGEMENT_FIELDS = ("event_id", "event_ts", "impression_id", "action")

EngagementOutcome = Literal["label", "duplicate", "late_label", "pending", "unknown_action"]
COUNTERS: tuple[str, ...] = (
    "impressions", "duplicate_impressions", "engagements", "duplicate_engagements",
    "late_labels", "orphans_dropped", "after_emit", "unknown_actions", "emitted",
)


@dataclass(frozen=True, kw_only=True)
class LabelJoinConfig:
    """How impressions are labelled; frozen and validated at definition.

    Args:
        label_window_ms: engagements up to this long after the impression are its labels.
        lateness_ms: allowed lateness of the source watermarks (bounds how long engagements
            wait for an impression that has not arrived, and how long emitted ids are kept).
    """

    label_window_ms: int
    lateness_ms: int = 60_000

    def __post_init__(self) -> None:
        for name, minimum in (("label_window_ms", 1), ("lateness_ms", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"{name} must be an int >= {minimum} (milliseconds), got {value!r}"
                )

    @property
    def version(self) -> str:
        """Hash of the parameters: state built under other parameters is never reused."""
        text = f"labeljoin/{self.label_window_ms}/{self.lateness_ms}"
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def build(self, state: Mapping[str, Any] | None = None) -> LabelJoin:
        """Return the runtime join, resumed from ``state`` when it was built by this config."""
        return LabelJoin(self, state)


@dataclass
class LabelJoinState:
    """What is known about one ``impression_id``: the impression, engagements, labels.

    ``labels`` maps an action to the time of its first engagement inside the window.
    ``pending`` holds ``(event_id, action, ts)`` of engagements seen before the impression.
    """

    impression: dict[str, Any] | None = None
    seen_events: set[str] = field(default_factory=set)
    labels: dict[str, int] = field(default_factory=dict)
    pending: list[tuple[str, str, int]] = field(default_factory=list)

    def add_impression(self, record: Mapping[str, Any], label_window_ms: int) -> int | None:
        """Keep ``record`` as the impression unless one is known.

        Engagements that were waiting for it become labels when inside the window.

        Returns:
            None when an impression was already known (``record`` is a duplicate), else the
            number of waiting engagements that fell outside the window (late labels).
        """
        if self.impression is not None:
            return None
        self.impression = {k: record[k] for k in IMPRESSION_FIELDS}
        end = self.impression["event_ts"] + label_window_ms
        pending, self.pending = self.pending, []
        outside = 0
        for _event_id, action, ts in pending:
            if ts >= end:
                outside += 1
            else:
                self._label(action, ts)
        return outside

    def add_engagement(
        self, event_id: str, action: str, ts: int, label_window_ms: int
    ) -> EngagementOutcome:
        """Fold one engagement in; return what became of it."""
        if event_id in self.seen_events:
            return "duplicate"
        self.seen_events.add(event_id)
        if action not in LABEL_ACTIONS:
            return "unknown_action"
        if self.impression is None:
            self.pending.append((event_id, action, int(ts)))
            return "pending"
        if ts >= self.impression["event_ts"] + label_window_ms:
            return "late_label"
        self._label(action, int(ts))
        return "label"

    def _label(self, action: str, ts: int) -> None:
        first = self.labels.get(action)
        if first is None or ts < first:
            self.labels[action] = ts

    def window_end(self, label_window_ms: int) -> int | None:
        """Event time at which the window closes (None before the impression is seen)."""
        return None if self.impression is None else self.impression["event_ts"] + label_window_ms

    def ready(self, watermark: int, label_window_ms: int) -> bool:
        """Whether the example is final: the impression is known and the watermark passed its window."""
        end = self.window_end(label_window_ms)
        return end is not None and watermark >= end

    def orphan_expiry(self, config: LabelJoinConfig) -> int | None:
        """Watermark past which pending engagements stop waiting (None with an impression)."""
        if self.impression is not None or not self.pending:
            return None
        newest = max(ts for _, _, ts in self.pending)
        return newest + config.label_window_ms + config.lateness_ms

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for snapshots."""
        return {
            "impression": self.impression,
            "seen_events": sorted(self.seen_events),
            "labels": dict(self.labels),
            "pending": [list(p) for p in self.pending],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LabelJoinState:
        """Rebuild from :meth:`to_dict`."""
        return cls(
            impression=data["impression"],
            seen_events=set(data["seen_events"]),
            labels=dict(data["labels"]),
            pending=[(e, a, int(t)) for e, a, t in data["pending"]],
        )


def make_example(
    impression: Mapping[str, Any], labels: Mapping[str, int], label_window_ms: int,
    matured_at: int | None,
) -> dict[str, Any]:
    """Return the training example of ``impression`` given ``labels`` (action -> first ts)."""
    row = {k: impression[k] for k in IMPRESSION_FIELDS}
    for k in ("model_versions", "scores", "features"):
        row[k] = dict(row[k] or {})
    for action in LABEL_ACTIONS:
        row[label_column(action)] = int(action in labels)
    row["first_engagement_ms"] = (
        max(0, min(labels.values()) - impression["event_ts"]) if labels else None
    )
    row["label_window_ms"] = label_window_ms
    row["matured_at"] = matured_at
    return row


class LabelJoin:
    """The label join of one shard of impression ids, made from a ``LabelJoinConfig``."""

    def __init__(self, config: LabelJoinConfig, state: Mapping[str, Any] | None = None):
        self.config = config
        self.counters: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self.keys: dict[str, LabelJoinState] = {}
        self.tombstones: dict[str, int] = {}  # emitted id -> watermark it is forgotten at
        self.partition_watermarks: dict[str, int] = {}
        if state is not None and state.get("version") == config.version:
            self.keys = {k: LabelJoinState.from_dict(v) for k, v in state["keys"].items()}
            self.tombstones = dict(state["tombstones"])
            self.partition_watermarks = dict(state["partition_watermarks"])
            self.counters.update(state["counters"])
        # min-heaps of (due watermark, id); entries may be stale and are checked on pop
        self._due: list[tuple[int, str]] = []
        self._orphans: list[tuple[int, str]] = []
        self._forget: list[tuple[int, str]] = [(w, k) for k, w in self.tombstones.items()]
        heapq.heapify(self._forget)
        for key, st in self.keys.items():
            self._schedule(key, st)

    # -- input ----------------------------------------------------------------

    def _schedule(self, key: str, st: LabelJoinState) -> None:
        end = st.window_end(self.config.label_window_ms)
        if end is not None:
            heapq.heappush(self._due, (end, key))
        else:
            expiry = st.orphan_expiry(self.config)
            if expiry is not None:
                heapq.heappush(self._orphans, (expiry, key))

    def add_impression(self, record: Mapping[str, Any]) -> bool:
        """Fold in one impression; return whether it was new (first copy of its id)."""
        key = record["impression_id"]
        self.counters["impressions"] += 1
        if key in self.tombstones:
            self.counters["duplicate_impressions"] += 1
            return False
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = LabelJoinState()
        outside = st.add_impression(record, self.config.label_window_ms)
        if outside is None:
            self.counters["duplicate_impressions"] += 1
            return False
        self.counters["late_labels"] += outside
        self._schedule(key, st)
        return True

    def add_engagement(self, record: Mapping[str, Any]) -> EngagementOutcome | Literal["after_emit"]:
        """Fold in one engagement; return what became of it."""
        key = record["impression_id"]
        self.counters["engagements"] += 1
        if key in self.tombstones:
            self.counters["after_emit"] += 1
            return "after_emit"
        st = self.keys.get(key)
        if st is None:
            st = self.keys[key] = LabelJoinState()
        outcome = st.add_engagement(record["event_id"], record["action"], int(record["event_ts"]),
                                    self.config.label_window_ms)
        if outcome == "duplicate":
            self.counters["duplicate_engagements"] += 1
        elif outcome == "late_label":
            self.counters["late_labels"] += 1
        elif outcome == "unknown_action":
            self.counters["unknown_actions"] += 1
            if st.impression is None and not st.pending and len(st.seen_events) == 1:
                del self.keys[key]  # nothing to wait for: do not keep the id forever
        elif outcome == "pending":
            heapq.heappush(self._orphans, (st.orphan_expiry(self.config), key))
        return outcome

    def add_columns(self, cols: EventColumns) -> None:
        """Fold in a batch of impressions or engagements (columnar, one topic)."""
        if cols.n == 0:
            return
        if cols.topic == "impressions":
            names = IMPRESSION_FIELDS
            add = self.add_impression
        elif cols.topic == "engagements":
            names = _ENGAGEMENT_FIELDS
            add = self.add_engagement  # type: ignore[assignment]
        else:
            raise ValueError(
                f"the label join reads impressions and engagements, got topic {cols.topic!r}"
            )
        lists = []
        for name in names:
            col = cols.values(name)
            lists.append(col.tolist() if isinstance(col, np.ndarray) else list(col))
        for values in zip(*lists, strict=True):
            add(dict(zip(names, values, strict=True)))

    # -- watermarks and output ------------------------------------------------

    def advance(self, part: str, watermark: int) -> None:
        """Record that source partition ``part`` has reached ``watermark`` (never moves back)."""
        if watermark > self.partition_watermarks.get(part, NO_WATERMARK):
            self.partition_watermarks[part] = int(watermark)

    def watermark(self, parts: Iterable[str]) -> int:
        """Minimum watermark over ``parts``; a partition never heard from holds it at
        NO_WATERMARK, an idle one is left out (``features.watermarks``)."""
        return combined_watermark(self.partition_watermarks, parts)

    def flush(self, watermark: int) -> list[dict[str, Any]]:
        """Return the examples whose window the ``watermark`` has passed; forget their state.

        Also drops engagements that waited too long for their impression and forgets
        emitted ids past their tombstone time.
        """
        out: list[dict[str, Any]] = []
        window = self.config.label_window_ms
        while self._due and self._due[0][0] <= watermark:
            _, key = heapq.heappop(self._due)
            st = self.keys.get(key)
            if st is None or not st.ready(watermark, window):
                continue
            out.append(make_example(st.impression, st.labels, window, watermark))
            del self.keys[key]
            forget = st.impression["event_ts"] + window + self.config.lateness_ms
            self.tombstones[key] = forget
            heapq.heappush(self._forget, (forget, key))
        while self._orphans and self._orphans[0][0] <= watermark:
            _, key = heapq.heappop(self._orphans)
            st = self.keys.get(key)
            if st is None or st.impression is not None:
                continue
            expiry = st.orphan_expiry(self.config)
            if expiry is not None and expiry > watermark:
                heapq.heappush(self._orphans, (expiry, key))  # a newer engagement came since
                continue
            self.counters["orphans_dropped"] += len(st.pending)
            del self.keys[key]
        while self._forget and self._forget[0][0] <= watermark:
            _, key = heapq.heappop(self._forget)
            if self.tombstones.get(key, watermark + 1) <= watermark:
                del self.tombstones[key]
        self.counters["emitted"] += len(out)
        return out

    def snapshot(self) -> dict[str, Any]:
        """Plain-data state for recovery (``build`` resumes from it)."""
        return {
            "version": self.config.version,
            "keys": {k: st.to_dict() for k, st in self.keys.items()},
            "tombstones": dict(self.tombstones),
            "partition_watermarks": dict(self.partition_watermarks),
            "counters": dict(self.counters),
        }


def join_reference(
    impressions: Sequence[Mapping[str, Any]],
    engagements: Sequence[Mapping[str, Any]],
    window: int,
) -> list[dict[str, Any]]:
    """Brute-force label join, for tests: one example per distinct impression id.

    The first impression of an id wins; an engagement ``event_id`` counts once (its first
    copy); an engagement labels its impression when ``event_ts < impression ts + window``.
    ``matured_at`` is None. Sorted by ``impression_id``.
    """
    first_imp: dict[str, Mapping[str, Any]] = {}
    for imp in impressions:
        first_imp.setdefault(imp["impression_id"], imp)
    first_eng: dict[str, Mapping[str, Any]] = {}
    for eng in engagements:
        first_eng.setdefault(eng["event_id"], eng)
    out = []
    for key in sorted(first_imp):
        imp = first_imp[key]
        labels: dict[str, int] = {}
        for eng in first_eng.values():
            if eng["impression_id"] != key or eng["action"] not in LABEL_ACTIONS:
                continue
            if eng["event_ts"] < imp["event_ts"] + window:
                labels[eng["action"]] = min(labels.get(eng["action"], eng["event_ts"]),
                                            eng["event_ts"])
        out.append(make_example(imp, labels, window, None))
    return out
