"""Progress of a streaming worker: events in, rate, late, dead-lettered, watermark per topic.

A flow calls ``FlowProgress.observe`` on every source batch (one ``op.inspect`` step); every
``interval_s`` seconds it logs one ``<flow>.progress`` line, and ``summary`` gives the totals
(a bounded run logs them as ``<flow>.done``). Counters are per process, shared by its worker
threads under a lock (one acquisition per batch, not per event).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np

from features.watermarks import IDLE_WATERMARK, NO_WATERMARK
from tessera.logs import get_logger

log = get_logger("dataflows.progress")



def _iso(ms: int) -> str | None:
    if ms <= NO_WATERMARK // 2:
        return None
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="seconds")


@dataclass
class FlowProgress:
    """Counters of one worker process, logged every ``interval_s`` seconds."""

    flow: str
    interval_s: float = 5.0
    clock: Callable[[], float] = time.monotonic
    events: int = 0
    late: int = 0
    #: event-time range of the late events seen (None before any)
    late_from: int | None = None
    late_to: int | None = None
    deadlettered: int = 0
    #: events dropped as repeats of an event id within its topic's ``deduplicate`` horizon
    duplicates: int = 0
    partition_watermarks: dict[str, int] = field(default_factory=dict)
    #: per partition, the offset after the last message read (what a replay has covered)
    next_offsets: dict[str, int] = field(default_factory=dict)
    blocks_written: int = 0
    started: float | None = None
    _last_log: float = 0.0
    _last_events: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def observe(self, batch: Any) -> None:
        """Count a ``SourceBatch`` (events, late, dead letters, its partition's watermark)."""
        with self._lock:
            now = self.clock()
            if self.started is None:
                self.started = self._last_log = now
            n = len(batch.columns) + len(batch.deadletters)
            self.events += n
            n_late = int(batch.late.sum()) if len(batch.late) else 0
            if n_late:
                self.late += n_late
                ts = np.asarray(batch.columns.columns["event_ts"])[batch.late]
                lo, hi = int(ts.min()), int(ts.max())
                self.late_from = lo if self.late_from is None else min(self.late_from, lo)
                self.late_to = hi if self.late_to is None else max(self.late_to, hi)
            self.deadlettered += len(batch.deadletters)
            dup = getattr(batch, "duplicates", 0)
            self.duplicates += dup
            self.events += dup  # read from Kafka, then dropped
            part = batch.part
            if IDLE_WATERMARK > batch.watermark > self.partition_watermarks.get(part,
                                                                               NO_WATERMARK):
                self.partition_watermarks[part] = batch.watermark
            if batch.next_offset > self.next_offsets.get(part, -1):
                self.next_offsets[part] = batch.next_offset
            if now - self._last_log >= self.interval_s:
                rate = (self.events - self._last_events) / max(now - self._last_log, 1e-9)
                self._last_log, self._last_events = now, self.events
                log.info(f"{self.flow}.progress", events_per_s=round(rate), **self._fields())

    def add_blocks(self, n: int) -> None:
        """Count blocks written to the online store (the store sink calls this)."""
        with self._lock:
            self.blocks_written += n

    def offsets(self) -> dict[str, int]:
        """Per partition (``topic:partition``), the offset after the last message read."""
        with self._lock:
            return dict(self.next_offsets)

    def watermarks(self) -> dict[str, str | None]:
        """Per topic, the lowest partition watermark seen (ISO time; None before any)."""
        by_topic: dict[str, int] = {}
        for part, wm in self.partition_watermarks.items():
            topic = part.rsplit(":", 1)[0]
            by_topic[topic] = min(by_topic.get(topic, wm), wm)
        return {t: _iso(wm) for t, wm in sorted(by_topic.items())}

    def _fields(self) -> dict[str, Any]:
        return {"events": self.events, "late": self.late, "deadlettered": self.deadlettered,
                "duplicates": self.duplicates, "blocks_written": self.blocks_written, "watermarks": self.watermarks()}

    def summary(self) -> dict[str, Any]:
        """Totals so far, with the mean rate since the first batch."""
        with self._lock:
            elapsed = (self.clock() - self.started) if self.started is not None else 0.0
            rate = self.events / elapsed if elapsed > 0 else 0.0
            return {**self._fields(), "seconds": round(elapsed, 1),
                    "events_per_s": round(rate)}

    def log_summary(self) -> dict[str, Any]:
        """Log the totals as ``<flow>.done`` and return them."""
        totals = self.summary()
        log.info(f"{self.flow}.done", **totals)
        return totals
