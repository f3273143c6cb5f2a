"""The rule that combines partition watermarks into one, with idle partitions left out.

A stream's watermark is the lowest of its partitions' watermarks: a partition never heard
from holds it at ``NO_WATERMARK``. A partition that will send nothing for a while, or never
again, reports ``IDLE_WATERMARK`` (Flink's ``withIdleness``): it no longer holds the others
back. When every partition is idle, nothing is known: ``NO_WATERMARK``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

NO_WATERMARK = -(2**62)
"""No event time known yet."""
IDLE_WATERMARK = 2**62
"""Reported by a partition that is idle (or, bounded, ended without an event)."""


def combined_watermark(watermarks: Mapping[str, int], parts: Iterable[str]) -> int:
    """The lowest watermark of ``parts`` (missing: ``NO_WATERMARK``), idle ones left out."""
    low = None
    for p in parts:
        wm = watermarks.get(p, NO_WATERMARK)
        if wm >= IDLE_WATERMARK:
            continue
        low = wm if low is None else min(low, wm)
    return NO_WATERMARK if low is None else low
