"""Exceptions of the synthetic world generator."""

from __future__ import annotations

from typing import Any

from features.errors import TesseraError


class SynthError(TesseraError):
    """Base class of every error ``tessera.synth`` raises on purpose."""


class WorldConfigError(SynthError, ValueError):
    """A ``WorldConfig`` parameter is out of range.

    The message names the parameter, the allowed range, the value received and a fix.
    """

    def __init__(self, parameter: str, expected: str, value: Any, fix: str = ""):
        self.parameter = parameter
        self.expected = expected
        self.value = value
        msg = f"WorldConfig.{parameter} must be {expected}, got {value!r}"
        if fix:
            msg += f"; {fix}"
        super().__init__(msg)


class SinkError(SynthError):
    """Writing generated events to a sink (Kafka, Parquet) failed."""
