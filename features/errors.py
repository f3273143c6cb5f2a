"""Exceptions of the feature engine: one hierarchy, each message says how to fix it."""

from __future__ import annotations


class TesseraError(Exception):
    """Base class of every error Tessera raises on purpose."""


class FeatureSpecError(TesseraError):
    """A feature definition is invalid.

    The message names the file, the feature and the reason, e.g.
    ``features.yaml: feature 'item_views': window '7m' is not a multiple of the block size 5m``.
    """

    def __init__(self, reason: str, *, file: str | None = None, feature: str | None = None):
        self.reason = reason
        self.file = file
        self.feature = feature
        where = []
        if file:
            where.append(str(file))
        if feature:
            where.append(f"feature {feature!r}")
        prefix = ": ".join(where)
        super().__init__(f"{prefix}: {reason}" if prefix else reason)


class FilterSyntaxError(FeatureSpecError):
    """A filter or derived expression is not valid in the safe expression language."""


class DurationError(TesseraError, ValueError):
    """A duration string such as ``5m`` or ``30d`` could not be parsed."""


class TilingError(TesseraError, ValueError):
    """A window cannot be covered by the given block sizes."""


class RepDecodeError(TesseraError, ValueError):
    """Serialized aggregation reps are truncated or malformed."""
