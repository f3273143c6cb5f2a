"""The peer's side of the streaming bench's features, without Quix Streams.

:class:`PeerFeature` is one ``features.yaml`` feature as the Quix peer computes it (its
window column and filter). The bench's output check reads the peer's windows through it in
the bench's own interpreter, which need not have ``quixstreams``: the peer runs in its own
venv (``bench/streaming.py --quix-python``), since Quix Streams pins an older
confluent-kafka than the project's lock. ``bench/quix_peer.py`` builds Quix's aggregators
from it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Event = dict[str, Any]
Filter = Callable[[Event], bool]

FILTERS: dict[str, tuple[tuple[str, ...], Filter]] = {
    "dwell_ms > 0": (("dwell_ms",), lambda e: e["dwell_ms"] > 0),
    "dwell_ms > 8000 and topic != ''": (
        ("dwell_ms", "topic"), lambda e: e["dwell_ms"] > 8000 and e["topic"] != ""),
}
"""Python translations of the feature filters, keyed by their text in ``features.yaml``:
the fields each reads, and the test."""


@dataclass(frozen=True)
class PeerFeature:
    """One feature as the peer computes it: its window column and how to fill it."""

    name: str
    entity: str
    aggregation: str
    value: str | None
    keep: Filter | None
    params: dict[str, float]
    #: event fields the feature reads: its value, its filter's inputs, the event time
    reads: tuple[str, ...]

    @classmethod
    def from_spec(cls, spec: Any) -> PeerFeature:
        """Translate a ``features.spec.FeatureSpec``; its filter must be in ``FILTERS``."""
        keep, reads = None, ["event_ts"] + ([spec.value] if spec.value else [])
        if spec.filter:
            if spec.filter not in FILTERS:
                raise ValueError(
                    f"feature {spec.name!r}: no Python translation of the filter "
                    f"{spec.filter!r}; add it to bench/peer_features.py FILTERS")
            fields, keep = FILTERS[spec.filter]
            reads += fields
        return cls(spec.name, spec.entity, spec.aggregation, spec.value, keep,
                   dict(spec.params), tuple(dict.fromkeys(reads)))

    def column(self, event: Event) -> Any:
        """This feature's window column for ``event``: None when the event does not count."""
        if self.keep is not None and not self.keep(event):
            return None
        if self.aggregation == "count":
            return 1
        value = event[self.value]
        if self.aggregation == "last_n":
            return None if value is None else [event["event_ts"], value]
        return value
