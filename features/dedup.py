"""Counting an event id once: the ids a source partition admitted within a horizon.

Producers send the same event twice (a mobile client retrying, a producer retrying after a
timeout). Kafka's exactly-once covers offsets, not this: both copies have their own offset.
``SeenIds`` remembers the 64-bit hashes of the event ids one partition admitted, for events
up to ``horizon_ms`` of event time behind the newest it saw, and admits a batch's events
whose id it has not seen (the first of equal ids within a batch). Columnar: one ``unique``
and a ``searchsorted`` per sorted run per batch; no Python per event.

Memory: 8 bytes per remembered id (plus sort buffers while runs merge); ids are kept in
sorted runs merged like a log-structured tree (two neighbours merge when the older is less
than twice the newer's size and their newest events are within a quarter horizon), and a
run is dropped once its newest event is past the horizon: what is kept is about 1.25
horizons of ids. Ids are compared by hash: two different ids collide with probability about
n^2 / 2^65 for n ids remembered (one in ~400,000 for 10 million), and the later one would be
dropped as a duplicate.

Restarts: the ids are not snapshotted (10 minutes of a busy partition is millions of ids,
too many for every epoch's snapshot). Each run keeps the lowest Kafka offset of the batches
its ids came from; ``oldest_offset`` is the lowest over what is remembered, and a source that
resumes reads its log again from there, admitting (not emitting) up to where it stopped: the
memory is rebuilt from the log, which holds it anyway.
"""

from __future__ import annotations

import numpy as np

from features.watermarks import NO_WATERMARK as NO_TIME

#: no offset known (ids admitted without one, or nothing remembered)
NO_OFFSET = 2**62


class SeenIds:
    """Event-id hashes admitted by one partition within ``horizon_ms`` of event time."""

    #: admitted ids wait here (unsorted) until this many, then become a sorted run
    STAGE_IDS = 16_384

    def __init__(self, horizon_ms: int) -> None:
        if horizon_ms <= 0:
            raise ValueError(f"horizon_ms must be positive, got {horizon_ms}")
        self.horizon_ms = int(horizon_ms)
        self.max_ts = NO_TIME
        #: sorted runs, oldest first: (hashes ascending, newest event time in the run,
        #: lowest offset of the batches the ids came from)
        self._runs: list[tuple[np.ndarray, int, int]] = []
        self._stage: list[np.ndarray] = []
        self._stage_n = 0
        self._stage_ts = NO_TIME
        self._stage_offset = NO_OFFSET

    def __len__(self) -> int:
        """Ids remembered."""
        return self._stage_n + sum(len(r) for r, _, _ in self._runs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the remembered hashes."""
        return 8 * len(self)

    @property
    def oldest_offset(self) -> int | None:
        """The lowest offset of a batch whose ids are remembered (None: none, or unknown):
        reading the log again from there and admitting rebuilds this memory."""
        low = min([self._stage_offset if self._stage_n else NO_OFFSET,
                   *(o for _, _, o in self._runs)])
        return None if low >= NO_OFFSET else low

    def rebase(self, offset: int) -> None:
        """The log was replaced (offsets start over at ``offset``): the ids stay remembered,
        but a re-read can only start at the new log's ``offset``."""
        self._runs = [(r, t, offset) for r, t, _ in self._runs]
        if self._stage_n:
            self._stage_offset = offset

    def admit(self, hashes: np.ndarray, ts: np.ndarray, offset: int | None = None) -> np.ndarray:
        """Return a mask of the events to count: True for an id not seen within the horizon
        (and the first of equal ids in this batch); remember the admitted ids.

        ``hashes`` are uint64 event-id hashes, ``ts`` the events' times (epoch ms);
        ``offset`` the Kafka offset of the batch's first message (see ``oldest_offset``).
        """
        hashes = np.asarray(hashes, dtype=np.uint64)
        n = len(hashes)
        fresh = np.zeros(n, dtype=bool)
        if n == 0:
            return fresh
        _, first = np.unique(hashes, return_index=True)
        fresh[first] = True
        cand = first
        h = hashes[cand]
        seen = np.zeros(len(cand), dtype=bool)
        for run, _, _ in self._runs:
            pos = np.searchsorted(run, h)
            np.minimum(pos, len(run) - 1, out=pos)
            seen |= run[pos] == h
        if self._stage_n:
            seen |= np.isin(h, np.concatenate(self._stage))
        fresh[cand[seen]] = False
        kept = h[~seen]
        newest = int(np.max(ts))
        if len(kept):
            self._stage.append(kept)
            self._stage_n += len(kept)
            self._stage_ts = max(self._stage_ts, int(np.max(np.asarray(ts)[cand[~seen]])))
            if offset is not None:
                self._stage_offset = min(self._stage_offset, int(offset))
        self.max_ts = max(self.max_ts, newest)
        if self._stage_n >= self.STAGE_IDS:
            self._seal_stage()
        self._expire()
        return fresh

    def _seal_stage(self) -> None:
        run = np.sort(np.concatenate(self._stage))
        self._runs.append((run, self._stage_ts, self._stage_offset))
        self._stage, self._stage_n, self._stage_ts = [], 0, NO_TIME
        self._stage_offset = NO_OFFSET
        # merge while the older neighbour is less than twice as large (O(log n) runs) and
        # its newest event within a quarter horizon of the newer one's: a run expires as a
        # whole, so a merge delays the older ids' expiry by at most that quarter
        span = self.horizon_ms // 4
        while len(self._runs) >= 2 and len(self._runs[-2][0]) < 2 * len(self._runs[-1][0]) \
                and self._runs[-1][1] - self._runs[-2][1] <= span:
            (a, ta, oa), (b, tb, ob) = self._runs[-2], self._runs[-1]
            merged = np.concatenate((a, b))
            merged.sort(kind="mergesort")
            self._runs[-2:] = [(merged, max(ta, tb), min(oa, ob))]

    def _expire(self) -> None:
        cutoff = self.max_ts - self.horizon_ms
        self._runs = [run for run in self._runs if run[1] >= cutoff]
        if self._stage_n and self._stage_ts < cutoff:
            self._stage, self._stage_n, self._stage_ts = [], 0, NO_TIME
            self._stage_offset = NO_OFFSET
