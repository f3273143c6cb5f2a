"""Serving errors: each maps to an HTTP status and names the field at fault."""

from __future__ import annotations

from features.errors import TesseraError


class ServingError(TesseraError):
    """Base class of the serving endpoint's errors."""

    status = 500

    def __init__(self, message: str, *, field: str | None = None):
        super().__init__(message)
        self.message = message
        self.field = field


class BadRequest(ServingError):
    """The request is malformed; ``field`` names the part at fault (HTTP 400/422)."""

    status = 422


class NotFound(ServingError):
    """An unknown user, item or feature (HTTP 404)."""

    status = 404


class Unauthorized(ServingError):
    """Missing or wrong API key (HTTP 401)."""

    status = 401


class PayloadTooLarge(ServingError):
    """The request body is over the size limit (HTTP 413)."""

    status = 413


class Overloaded(ServingError):
    """The endpoint is at capacity (HTTP 503 with Retry-After)."""

    status = 503
