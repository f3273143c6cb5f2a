"""Replay markers: which features a replay is still computing (the one owner of their keys).

A replay raises the watermark ``replay/{feature_key}/started`` to its run id (wall-clock
ms) before it writes any block, and ``replay/{feature_key}/done`` to the same id once every
block is written. Watermarks only rise, so a feature is being replayed (or a replay of it
failed part way) exactly when ``started > done``; reads flag such a feature stale rather
than serve its partial values as if they were whole.
"""

from __future__ import annotations

from collections.abc import Mapping

PREFIX = "replay/"


def started_key(feature_key: str) -> str:
    """Watermark raised to the run id when a replay of ``feature_key`` starts."""
    return f"{PREFIX}{feature_key}/started"


def done_key(feature_key: str) -> str:
    """Watermark raised to the run id when a replay of ``feature_key`` has written everything."""
    return f"{PREFIX}{feature_key}/done"


def pending(marks: Mapping[str, int]) -> set[str]:
    """Feature keys whose latest replay has not finished, from the ``replay/`` watermarks."""
    out = set()
    for name, started in marks.items():
        if name.startswith(PREFIX) and name.endswith("/started"):
            key = name[len(PREFIX):-len("/started")]
            if started > marks.get(done_key(key), -1):
                out.add(key)
    return out
