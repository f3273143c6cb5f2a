"""Serving's collector pauses: timed into a histogram, and the loaded state frozen."""

from __future__ import annotations

import gc

from prometheus_client import CollectorRegistry, Histogram

from serving.gcpause import GcFreezer, GcPauses


def _count(hist: Histogram) -> float:
    return sum(s.value for m in hist.collect() for s in m.samples if s.name.endswith("_count"))


def test_every_collection_is_timed_while_installed():
    hist = Histogram("gc_pause_test", "x", ["generation"], registry=CollectorRegistry())
    pauses = GcPauses(hist).install()
    try:
        gc.collect()
        gc.collect(0)
        assert _count(hist) >= 2
    finally:
        pauses.uninstall()
    before = _count(hist)
    gc.collect()
    assert _count(hist) == before  # uninstalled: no longer called


def test_refreeze_takes_what_is_alive_out_of_full_collections():
    thresholds = gc.get_threshold()
    try:
        freezer = GcFreezer()
        kept = [{"i": i} for i in range(10_000)]  # long-lived containers, as a catalog's
        frozen = freezer.refreeze(full=True)
        assert frozen >= len(kept)
        assert gc.get_threshold() == GcFreezer.THRESHOLDS
        # a young collection plus freeze keeps what was frozen frozen
        assert freezer.refreeze() >= frozen
        freezer.release()
        assert gc.get_freeze_count() == 0 and gc.get_threshold() == thresholds
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)
