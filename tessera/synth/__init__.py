"""Synthetic world: a seeded population of users, items and authors, and its event streams.

``WorldConfig`` describes the world, ``World`` builds it, ``generate_events`` plays it
as columnar event chunks in emission order, and the sinks write those chunks to Kafka,
Parquet or plain Python records.
"""

from tessera.synth.errors import SynthError, WorldConfigError
from tessera.synth.generate import EventChunk, GenerationSummary, generate_events
from tessera.synth.sinks import generate_records, write_to_kafka, write_to_parquet
from tessera.synth.world import DelayConfig, EngagementRates, SurfaceMix, World, WorldConfig

__all__ = [
    "DelayConfig",
    "EngagementRates",
    "EventChunk",
    "GenerationSummary",
    "SurfaceMix",
    "SynthError",
    "World",
    "WorldConfig",
    "WorldConfigError",
    "generate_events",
    "generate_records",
    "write_to_kafka",
    "write_to_parquet",
]
