"""Logging with structlog: JSON in production, readable in a terminal otherwise.

Standard-library loggers (uvicorn, Procrastinate, SQLAlchemy) are routed
through the same renderer so every line has one shape.
"""

from __future__ import annotations

import logging
import sys

import structlog

from forgeline.settings import Settings


def configure_logging(settings: Settings) -> None:
    """Set up structlog and the standard library's root logger."""
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor
    if settings.environment == "prod" or not sys.stderr.isatty():
        # Tracebacks as plain text lines, never with local variables.
        shared.append(
            structlog.processors.ExceptionRenderer(
                structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
            )
        )
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(exception_formatter=structlog.dev.plain_traceback)
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(foreign_pre_chain=shared, processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer,
        ])
    )  # fmt: skip
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # Procrastinate logs every job at info; keep it to warnings unless debugging.
    if settings.log_level != "debug":
        for noisy in ("procrastinate", "alembic", "pgserver", "httpx", "aiohttp"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
