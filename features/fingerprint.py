"""Fingerprints of list feature values, so serving can log a list in its float feature map.

A ``last_n`` value (the user's recent topics, say) is a list; the impression's logged
``features`` map holds doubles. Serving logs each list as ``<name>#fp``: a 52-bit hash of
the list's canonical JSON, an integer a double holds exactly (Avro, Iceberg and the
training table's JSON all keep it). The consistency check recomputes the list offline and
compares fingerprints: equal lists, equal fingerprints; a different list differs except with
probability 2**-52. This module owns the suffix and the hash; both sides import it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

__all__ = ["FINGERPRINT_SUFFIX", "fingerprint_name", "list_fingerprint"]

FINGERPRINT_SUFFIX = "#fp"
_BITS = 52


def fingerprint_name(name: str) -> str:
    """The logged name of list feature ``name``'s fingerprint."""
    return f"{name}{FINGERPRINT_SUFFIX}"


def list_fingerprint(values: Sequence[Any] | None) -> float:
    """Return the fingerprint of a list value (``None`` counts as the empty list).

    The canonical form is compact JSON of the list in its order (newest first for
    ``last_n``), so ``["a", "b"]`` and ``["b", "a"]`` differ, and so do ``["1"]`` and
    ``[1]``. The result is an integer below 2**52, as a float.
    """
    text = json.dumps(list(values or ()), separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return float(int.from_bytes(digest, "big") >> (64 - _BITS))
