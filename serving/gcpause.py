"""Garbage-collector pauses of the serving process: measured, and kept short.

CPython's cyclic collector stops the interpreter for a full (generation 2) collection in
time proportional to every tracked object alive: the catalog, caches and model state of a
serving process make that tens of milliseconds, a request's tail latency. ``GcPauses``
times every collection (``gc.callbacks``) into ``tessera_gc_pause_seconds{generation}``
and logs one ``serving.gc_pause`` line for a pause over ``log_over_s``. ``GcFreezer`` moves
what is alive into the permanent generation (``gc.freeze``), which full collections skip:
once the state is loaded and after each catalog refresh. Measured (bench/serving.py
--quick, 20k items): a full collection every ~6 s took 33-41 ms, collecting nothing.
"""

from __future__ import annotations

import gc
import time

import structlog

log = structlog.get_logger("serving.gcpause")


class GcPauses:
    """Times the collector's pauses while installed (``install``/``uninstall``)."""

    def __init__(self, histogram, log_over_s: float = 0.02) -> None:
        self.histogram = histogram
        self.log_over_s = log_over_s
        self._started = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        gen = info.get("generation", -1)
        self.histogram.labels(generation=str(gen)).observe(took)
        if took > self.log_over_s:
            try:  # a collector callback must never raise (stderr may be closed at exit)
                log.warning("serving.gc_pause", generation=gen, ms=round(took * 1000, 1),
                            collected=info.get("collected"))
            except (OSError, ValueError):
                pass

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


class GcFreezer:
    """Keeps the serving process's long-lived objects frozen (out of full collections).

    ``refreeze()`` after the state changes (a catalog rebuild, a model or snapshot swap):
    a youngest-generation collection, then ``gc.freeze``. Cyclic garbage that reached the old
    generation before it was found would stay frozen, so every ``full_every_s`` (and on
    ``refreeze(full=True)``) everything is unfrozen, collected once in full, and frozen
    again: one full pause every few minutes instead of one every few seconds.
    """

    #: (young, middle, old) collection thresholds while serving. A request allocates
    #: thousands of containers: with the default (700, 10, 10) an old collection ran every
    #: few seconds. The middle generation stays small (10,000 x 10 objects: a few ms to
    #: scan; 50,000 x 50 took 40 ms at 100k items); old collections come only from
    #: ``refreeze(full=True)`` in practice.
    THRESHOLDS = (10_000, 10, 1_000)

    def __init__(self, full_every_s: float = 600.0) -> None:
        self.full_every_s = full_every_s
        self._last_full = 0.0
        self._saved = gc.get_threshold()
        gc.set_threshold(*self.THRESHOLDS)

    def release(self) -> None:
        """Unfreeze and put the collector's thresholds back (the server is closing)."""
        gc.unfreeze()
        gc.set_threshold(*self._saved)

    def refreeze(self, full: bool = False) -> int:
        """Freeze what is alive now; return the number of objects frozen."""
        now = time.monotonic()
        if full or now - self._last_full >= self.full_every_s:
            gc.unfreeze()
            gc.collect()
            self._last_full = now
        else:
            gc.collect(0)
        gc.freeze()
        return gc.get_freeze_count()
