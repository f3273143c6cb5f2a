"""The OpenAPI 3.1 schema of the serving endpoint (served at /openapi.json)."""

from __future__ import annotations

_ERROR = {
    "type": "object",
    "required": ["error", "field"],
    "properties": {"error": {"type": "string"}, "field": {"type": ["string", "null"]}},
}
_ID = {"type": "string", "minLength": 1, "maxLength": 128}


def _errors(*codes: int) -> dict:
    return {str(c): {"description": "error", "content": {"application/json": {
        "schema": {"$ref": "#/components/schemas/Error"}}}} for c in codes}


OPENAPI: dict = {
    "openapi": "3.1.0",
    "info": {"title": "Tessera serving", "version": "1.0.0",
             "description": "Ranked feeds, engagement intake and feature lookup."},
    "paths": {
        "/v1/feed": {"post": {
            "summary": "A ranked feed page for a user",
            "requestBody": {"required": True, "content": {"application/json": {
                "schema": {"$ref": "#/components/schemas/FeedRequest"}}}},
            "responses": {"200": {"description": "ranked items", "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/FeedResponse"}}}},
                **_errors(400, 401, 413, 422, 503)},
        }},
        "/v1/events": {"post": {
            "summary": "Engagements from clients (one or a list)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "oneOf": [{"$ref": "#/components/schemas/Engagement"},
                          {"type": "array", "maxItems": 1000,
                           "items": {"$ref": "#/components/schemas/Engagement"}}]}}}},
            "responses": {"202": {"description": "accepted", "content": {"application/json": {
                "schema": {"type": "object", "properties": {
                    "accepted": {"type": "integer"},
                    "event_ids": {"type": "array", "items": {"type": "string"}}}}}}},
                **_errors(400, 401, 413, 422, 500)},
        }},
        "/v1/features": {"get": {
            "summary": "Feature lookup for debugging",
            "parameters": [
                {"name": "entity", "in": "query", "required": True,
                 "schema": {"type": "string", "enum": ["item", "user", "author"]}},
                {"name": "ids", "in": "query", "required": True, "schema": {"type": "string"}},
                {"name": "names", "in": "query", "required": False, "schema": {"type": "string"}},
                {"name": "at", "in": "query", "required": False,
                 "schema": {"type": "string", "pattern": "^[0-9]+$"}},
            ],
            "responses": {"200": {"description": "feature rows", "content": {
                "application/json": {"schema": {"type": "object"}}}}, **_errors(400, 401, 422)},
        }},
        "/healthz": {"get": {"summary": "Liveness", "responses": {"200": {"description": "ok"}}}},
        "/readyz": {"get": {"summary": "Readiness", "responses": {
            "200": {"description": "ready"}, "503": {"description": "not ready"}}}},
        "/metrics": {"get": {"summary": "Prometheus metrics",
                             "responses": {"200": {"description": "text exposition"}}}},
    },
    "components": {"schemas": {
        "Error": _ERROR,
        "FeedRequest": {
            "type": "object", "required": ["user_id"], "additionalProperties": False,
            "properties": {
                "user_id": _ID,
                "feed_type": {"type": "string", "enum": ["EXPLORE", "FOLLOW", "NEARBY"],
                              "default": "EXPLORE"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            },
        },
        "FeedItem": {"type": "object", "properties": {
            "item_id": {"type": "string"}, "author_id": {"type": "string"},
            "score": {"type": "number"}, "source": {"type": "string"},
            "position": {"type": "integer"}, "impression_id": {"type": "string"}}},
        "FeedResponse": {"type": "object", "properties": {
            "request_id": {"type": "string"},
            "items": {"type": "array", "items": {"$ref": "#/components/schemas/FeedItem"}},
            "model_versions": {"type": "object", "additionalProperties": {"type": "string"}},
            "feature_watermark": {"type": "integer"},
            "degraded": {"type": "array", "items": {"type": "string"}}}},
        "Engagement": {
            "type": "object", "additionalProperties": False,
            "required": ["impression_id", "user_id", "item_id", "action"],
            "properties": {
                "impression_id": _ID, "user_id": _ID, "item_id": _ID, "event_id": _ID,
                "action": {"type": "string", "enum": ["click", "like", "share", "save", "hide"]},
                "event_ts": {"type": "integer", "minimum": 1},
                "dwell_ms": {"type": "integer", "minimum": 0},
            },
        },
    }},
}
