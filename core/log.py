"""Logging: structlog, JSON lines when stderr is not a TTY, key=value on a TTY; every line has plugin=."""

from __future__ import annotations

import logging
import os
import sys

import structlog


def _default_plugin(_logger, _name, event: dict) -> dict:
    event.setdefault("plugin", "core")
    return event


def _log_stream():
    """Our own handle on fd 2: the loader points fd 2 at a file while BCC compiles (to catch its
    diagnostics), and log lines written meanwhile by other threads must still reach stderr."""
    try:
        return os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    except (OSError, ValueError, AttributeError):
        return sys.stderr


def configure(level: str = "info", *, json: bool | None = None) -> None:
    if json is None:
        json = not sys.stderr.isatty()
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _default_plugin,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelNamesMapping()[level.upper()]),
        logger_factory=structlog.PrintLoggerFactory(file=_log_stream()),
        cache_logger_on_first_use=False,
    )


def get(plugin: str = "core"):
    """A logger bound to ``plugin``. Lazy: module-level loggers follow configure() called later."""
    return structlog.get_logger("sluice", plugin=plugin)
