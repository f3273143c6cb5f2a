"""Durations and time alignment. All Tessera times are integer epoch milliseconds (UTC)."""

from __future__ import annotations

import re
from datetime import UTC, datetime

from features.errors import DurationError

MS = 1
SECOND = 1_000
MINUTE = 60 * SECOND
HOUR = 60 * MINUTE
DAY = 24 * HOUR

_UNITS = {"ms": MS, "s": SECOND, "m": MINUTE, "h": HOUR, "d": DAY, "w": 7 * DAY}
_DURATION = re.compile(r"^\s*(\d+)\s*(ms|s|m|h|d|w)\s*$")


def parse_duration(text: str | int) -> int:
    """Parse ``'5m'``, ``'1h'``, ``'30d'`` (units ms, s, m, h, d, w) into milliseconds.

    Raises:
        DurationError: the text is not ``<positive integer><unit>``.
    """
    if isinstance(text, bool):
        raise DurationError(f"expected a duration such as '5m' or '1h', got {text!r}")
    if isinstance(text, int):
        if text <= 0:
            raise DurationError(f"a duration must be positive, got {text!r} ms")
        return text
    match = _DURATION.match(str(text))
    if not match:
        raise DurationError(
            f"expected a duration such as '5m', '1h' or '30d' (units: ms, s, m, h, d, w), "
            f"got {text!r}"
        )
    value = int(match.group(1)) * _UNITS[match.group(2)]
    if value <= 0:
        raise DurationError(f"a duration must be positive, got {text!r}")
    return value


def format_duration(ms: int) -> str:
    """Format milliseconds with the largest unit that divides them exactly (``3600000 -> '1h'``)."""
    for unit in ("w", "d", "h", "m", "s"):
        size = _UNITS[unit]
        if ms % size == 0 and ms >= size:
            if unit == "w":
                return f"{ms // DAY}d"
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def align_down(ts: int, size: int) -> int:
    """Return the start of the epoch-aligned block of ``size`` ms containing ``ts``."""
    return ts - (ts % size)


def align_up(ts: int, size: int) -> int:
    """Return the smallest multiple of ``size`` that is ``>= ts``."""
    rem = ts % size
    return ts if rem == 0 else ts + size - rem


def to_iso(ts_ms: int) -> str:
    """Format epoch milliseconds as an ISO-8601 UTC string."""
    return datetime.fromtimestamp(ts_ms / 1000, tz=UTC).isoformat().replace("+00:00", "Z")


def parse_timestamp(text: str | int) -> int:
    """Parse an ISO-8601 time (``2026-11-29T16:05:00Z``) or epoch milliseconds into epoch ms."""
    if isinstance(text, int):
        return text
    s = str(text).strip()
    if s.isdigit():
        return int(s)
    try:
        dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    except ValueError as exc:
        raise DurationError(
            f"expected an ISO-8601 time such as 2026-11-29T16:05:00Z or epoch ms, got {text!r}"
        ) from exc
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return int(dt.timestamp() * 1000)
