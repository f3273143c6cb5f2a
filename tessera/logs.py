"""Configure structlog once for every Tessera process."""

from __future__ import annotations

import logging
import os
import sys

import structlog

_configured = False


def configure_logging(*, level: str | None = None, json: bool | None = None) -> None:
    """Configure structlog (idempotent): key-value lines on stderr, JSON when asked.

    Args:
        level: log level name; defaults to ``TESSERA_LOG_LEVEL`` or ``INFO``.
        json: render JSON lines; defaults to ``TESSERA_LOG_JSON=1``.
    """
    global _configured
    if _configured and level is None and json is None:
        return
    level_name = (level or os.environ.get("TESSERA_LOG_LEVEL", "INFO")).upper()
    as_json = json if json is not None else os.environ.get("TESSERA_LOG_JSON") == "1"
    renderer = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping().get(level_name, logging.INFO)
        ),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    _configured = True


def get_logger(name: str) -> structlog.typing.FilteringBoundLogger:
    """Return a structlog logger bound with ``component=name``.

    Configuration is applied on first use, so a command line that sets the level after
    import still governs every logger.
    """
    if not _configured:
        configure_logging()
    return structlog.get_logger(component=name)
