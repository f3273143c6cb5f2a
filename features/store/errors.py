"""Exceptions of the online store: one small hierarchy under ``TesseraError``."""

from __future__ import annotations

from features.errors import TesseraError


class StoreError(TesseraError):
    """The online store was asked something it cannot do (bad URL, bad argument, bad record)."""


class StoreUnavailableError(StoreError):
    """The store cannot be reached or opened right now (no server, missing directory, locked).

    Callers may retry later; nothing was written.
    """


class CorruptRecordError(StoreError, ValueError):
    """A stored record is truncated or malformed and cannot be decoded."""


class ReadOnlyStoreError(StoreError):
    """A write was attempted on a store opened with ``readonly=True``."""

    def __init__(self, operation: str):
        self.operation = operation
        super().__init__(
            f"{operation}: this store was opened with readonly=True; "
            "open it with open_store(url) (readonly=False) in the one writer process"
        )
