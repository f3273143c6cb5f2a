"""HTTP request models: parsed and validated by hand, every error naming its field."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from serving.errors import BadRequest

FeedType = Literal["EXPLORE", "FOLLOW", "NEARBY"]
FEED_TYPES: tuple[str, ...] = ("EXPLORE", "FOLLOW", "NEARBY")
ACTIONS: tuple[str, ...] = ("click", "like", "share", "save", "hide")
_MAX_ID = 128


@dataclass(frozen=True)
class FeedRequest:
    """``POST /v1/feed``."""

    user_id: str
    feed_type: str
    limit: int


def _id(body: dict, name: str, *, required: bool = True) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise BadRequest(f"{name} is required", field=name)
        return None
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{name} must be a non-empty string, got {type(value).__name__}",
                         field=name)
    if len(value) > _MAX_ID or "\x00" in value:
        raise BadRequest(f"{name} must be at most {_MAX_ID} characters without NUL", field=name)
    return value


def parse_feed(body: Any, *, default_limit: int, max_limit: int) -> FeedRequest:
    """Validate a feed request body; raise ``BadRequest`` naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object", field="body")
    unknown = sorted(set(body) - {"user_id", "feed_type", "limit"})
    if unknown:
        raise BadRequest(f"unknown fields {unknown}; allowed: user_id, feed_type, limit",
                         field=unknown[0])
    user_id = _id(body, "user_id")
    feed_type = body.get("feed_type", "EXPLORE")
    if feed_type not in FEED_TYPES:
        raise BadRequest(f"feed_type must be one of {', '.join(FEED_TYPES)}, got {feed_type!r}",
                         field="feed_type")
    limit = body.get("limit", default_limit)
    if isinstance(limit, bool) or not isinstance(limit, int):
        raise BadRequest(f"limit must be an integer, got {type(limit).__name__}", field="limit")
    if not 1 <= limit <= max_limit:
        raise BadRequest(f"limit must be between 1 and {max_limit}, got {limit}", field="limit")
    return FeedRequest(user_id, feed_type, limit)


def parse_engagements(body: Any, *, max_events: int = 1000) -> list[dict]:
    """Validate one engagement or a list; return engagement records ready for Avro."""
    items = body if isinstance(body, list) else [body]
    if not items:
        raise BadRequest("no engagements given", field="body")
    if len(items) > max_events:
        raise BadRequest(f"at most {max_events} engagements per request, got {len(items)}",
                         field="body")
    out = []
    now = int(time.time() * 1000)
    for i, ev in enumerate(items):
        where = f"[{i}]." if isinstance(body, list) else ""
        if not isinstance(ev, dict):
            raise BadRequest("each engagement must be a JSON object", field=f"{where}body")
        unknown = sorted(set(ev) - {"impression_id", "user_id", "item_id", "action", "event_ts",
                                    "dwell_ms", "event_id"})
        if unknown:
            raise BadRequest(f"unknown fields {unknown}", field=f"{where}{unknown[0]}")
        try:
            impression_id = _id(ev, "impression_id")
            user_id = _id(ev, "user_id")
            item_id = _id(ev, "item_id")
            event_id = _id(ev, "event_id", required=False)
        except BadRequest as exc:
            raise BadRequest(exc.message, field=f"{where}{exc.field}") from exc
        action = ev.get("action")
        if action not in ACTIONS:
            raise BadRequest(f"action must be one of {', '.join(ACTIONS)}, got {action!r}",
                             field=f"{where}action")
        ts = ev.get("event_ts", now)
        if isinstance(ts, bool) or not isinstance(ts, int) or ts <= 0:
            raise BadRequest("event_ts must be epoch milliseconds (a positive integer)",
                             field=f"{where}event_ts")
        if ts > now + 3_600_000:
            raise BadRequest("event_ts is more than an hour in the future", field=f"{where}event_ts")
        dwell = ev.get("dwell_ms", 0)
        if isinstance(dwell, bool) or not isinstance(dwell, int) or not 0 <= dwell < 2**63:
            raise BadRequest("dwell_ms must be a non-negative 64-bit integer",
                             field=f"{where}dwell_ms")
        out.append({
            "event_id": event_id or f"e-{uuid.uuid4().hex}", "event_ts": ts,
            "impression_id": impression_id, "user_id": user_id, "item_id": item_id,
            "author_id": "", "topic": "", "action": action, "dwell_ms": dwell,
        })
    return out
