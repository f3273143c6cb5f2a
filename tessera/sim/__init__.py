"""Closed-loop simulation: synthetic users request feeds over HTTP and engage like real ones."""

from tessera.sim.simulator import (
    ARMS,
    KafkaViewSink,
    Outcome,
    SimReport,
    Simulator,
    SimulatorConfig,
    SimulatorConfigError,
    SimulatorError,
    Stats,
    TickStats,
    arm_of,
    item_index,
)

__all__ = [
    "ARMS",
    "KafkaViewSink",
    "Outcome",
    "SimReport",
    "Simulator",
    "SimulatorConfig",
    "SimulatorConfigError",
    "SimulatorError",
    "Stats",
    "TickStats",
    "arm_of",
    "item_index",
]
