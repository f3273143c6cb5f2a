"""Declarative feature definitions: the frozen, validated objects every consumer shares.

A ``FeatureSpec`` says *what* to aggregate (source topic, entity key, aggregation, value
field, filter) and at which block sizes; its ``windows`` say which window values to read.
The loader (``features.spec_loader``) builds these from YAML and validates them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal, get_args

from features.timeutil import DAY, HOUR, MINUTE, format_duration

AggregationKind = Literal[
    "count", "sum", "mean", "min", "max", "last_n", "approx_distinct", "approx_quantile"
]
AGGREGATION_KINDS: tuple[str, ...] = get_args(AggregationKind)

DEFAULT_BLOCK_SIZES: tuple[int, ...] = (5 * MINUTE, HOUR, DAY)


@dataclass(frozen=True, kw_only=True)
class FeatureSpec:
    """One aggregation feature, read at one or more windows.

    Attributes:
        name: unique feature name, e.g. ``item_views``; window values are named
            ``item_views_1h``, ``item_views_30d``.
        source: Kafka topic the events come from (``views``, ``engagements``, ``impressions``).
        entity: event field holding the entity key, e.g. ``item_id``; the entity type is the
            field without ``_id`` (``item``).
        aggregation: one of ``AGGREGATION_KINDS``.
        value: event field aggregated (``None`` for ``count``).
        windows: window lengths in ms, each a multiple of the streaming block size.
        filter: source text of a filter in the safe expression language, or ``None``.
        block_sizes: ascending block sizes in ms, each dividing the next; the first is the
            streaming block size, the others are roll-ups.
        params: aggregation parameters (``n`` for ``last_n``, ``lg_k`` for ``approx_distinct``,
            ``k`` and ``quantile`` for ``approx_quantile``).
        freshness: freshness budget in ms: a read whose watermark lags the request time by
            more than this is flagged stale.
        default: value used when the entity has no data.
    """

    name: str
    source: str
    entity: str
    aggregation: AggregationKind
    value: str | None = None
    windows: tuple[int, ...]
    filter: str | None = None
    block_sizes: tuple[int, ...] = DEFAULT_BLOCK_SIZES
    params: Mapping[str, float] = field(default_factory=dict)
    freshness: int = 15 * MINUTE
    default: float = 0.0

    @property
    def entity_type(self) -> str:
        """Entity type derived from the key field: ``item_id -> item``."""
        return self.entity.removesuffix("_id")

    @property
    def streaming_block(self) -> int:
        """The finest block size, kept by the streaming flow."""
        return self.block_sizes[0]

    @cached_property
    def version(self) -> str:
        """Short hash of everything that changes the content of a block.

        Windows, freshness and default only change how blocks are read, so they are left out:
        adding a window reuses the blocks, changing the filter does not.
        """
        from features.aggregations import make_aggregation

        content = {
            "source": self.source,
            "entity": self.entity,
            "aggregation": self.aggregation,
            "value": self.value,
            "filter": self.filter,
            "block_sizes": list(self.block_sizes),
            "params": dict(sorted(self.params.items())),
        }
        rep_format = make_aggregation(self.aggregation, dict(self.params)).rep_format
        if rep_format != 1:  # a new rep layout never reads blocks written in an older one
            content["rep_format"] = rep_format
        payload = json.dumps(content, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:8]

    @property
    def key(self) -> str:
        """Versioned storage key of this feature's blocks: ``name@version``."""
        return f"{self.name}@{self.version}"

    def window_name(self, window: int) -> str:
        """Name of the value of this feature over ``window`` ms: ``item_views_6h``."""
        return f"{self.name}_{format_duration(window)}"

    def window_names(self) -> list[str]:
        """Names of all window values of this feature, in ``windows`` order."""
        return [self.window_name(w) for w in self.windows]


@dataclass(frozen=True, kw_only=True)
class DerivedFeatureSpec:
    """A read-time feature combining window values of one entity type with a safe expression.

    Example: ``item_ctr_1d = (item_clicks_1d + 1) / (item_impressions_1d + 20)``.
    """

    name: str
    entity_type: str
    expression: str
    inputs: tuple[str, ...]
    default: float = 0.0


TimeUnitName = Literal["ms", "s", "us", "iso"]


@dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """An event source declared in a features file (``sources:``), beside the built-in topics.

    Its Kafka topic is ``name``; its records are ``event_id``, ``event_ts`` (epoch ms) and
    ``fields`` (``schemas.registry.declared_schema``). ``time_column``/``time_unit`` and
    ``id_column`` say how files of such events write time and ids: ``tessera import`` reads
    them from there.

    Attributes:
        name: topic name (a feature's ``source``).
        fields: field name -> type (``string``, ``string?``, ``long``, ``int``, ``double``).
        time_column: the column of a file holding event time.
        time_unit: how that column is written: ``ms``, ``s``, ``us`` or ``iso``.
        id_column: the column holding event ids, or None (ids are generated on import).
    """

    name: str
    fields: Mapping[str, str]
    time_column: str = "event_ts"
    time_unit: TimeUnitName = "ms"
    id_column: str | None = None

    def to_dict(self) -> dict:
        """Plain data, as the features file writes it."""
        out: dict = {"name": self.name, "fields": dict(self.fields),
                     "event_time": {"field": self.time_column, "unit": self.time_unit}}
        if self.id_column is not None:
            out["event_id"] = self.id_column
        return out


@dataclass(frozen=True)
class FeatureSet:
    """All features of one definition file, validated together."""

    features: tuple[FeatureSpec, ...]
    derived: tuple[DerivedFeatureSpec, ...] = ()
    source_file: str | None = None
    declared: tuple[SourceSpec, ...] = ()
    #: topic -> horizon (ms of event time) within which an event id is counted once
    #: (``deduplicate:`` in the features file; topics not listed count every message)
    deduplicate: Mapping[str, int] = field(default_factory=dict)

    def declared_source(self, name: str) -> SourceSpec | None:
        """The declared source called ``name`` (None for a built-in topic or an unknown name)."""
        return next((s for s in self.declared if s.name == name), None)

    def get(self, name: str) -> FeatureSpec:
        """Return the feature called ``name`` (KeyError with the known names otherwise)."""
        for spec in self.features:
            if spec.name == name:
                return spec
        raise KeyError(f"unknown feature {name!r}; known: {sorted(f.name for f in self.features)}")

    def for_source(self, topic: str) -> tuple[FeatureSpec, ...]:
        """Features whose events come from ``topic``."""
        return tuple(f for f in self.features if f.source == topic)

    @property
    def sources(self) -> tuple[str, ...]:
        """Topics read by at least one feature, in first-use order."""
        seen: dict[str, None] = {}
        for f in self.features:
            seen.setdefault(f.source, None)
        return tuple(seen)
