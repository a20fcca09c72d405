"""Optional error reporting (Sentry) and tracing (OpenTelemetry), off unless configured.

Each is switched on by its own standard variables, read by its official
SDK: ``SENTRY_DSN`` (with ``SENTRY_ENVIRONMENT``, ``SENTRY_TRACES_SAMPLE_RATE``)
and the ``OTEL_*`` variables (``OTEL_EXPORTER_OTLP_ENDPOINT``,
``OTEL_SERVICE_NAME``, ``OTEL_TRACES_SAMPLER``...). The packages are the
``[sentry]`` and ``[otel]`` extras; asking for one that is not installed is
a configuration error, not a silent no-op.
"""

from __future__ import annotations

import os
from typing import Any

import structlog

from forgeline import __version__
from forgeline.errors import ConfigurationError
from forgeline.settings import Settings

logger = structlog.get_logger("forgeline.telemetry")

#: Variables that switch OpenTelemetry tracing on.
OTEL_SWITCHES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def sentry_enabled() -> bool:
    return bool(os.environ.get("SENTRY_DSN"))


def tracing_enabled() -> bool:
    return any(os.environ.get(name) for name in OTEL_SWITCHES)


def setup(settings: Settings) -> None:
    """Start Sentry and the OpenTelemetry tracer provider when their variables are set."""
    if sentry_enabled():
        _setup_sentry(settings)
    if tracing_enabled():
        _setup_tracing()


def instrument_app(app: Any) -> None:
    """Trace the app's requests when tracing is on (route templates as span names)."""
    if not tracing_enabled():
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")


def _setup_sentry(settings: Settings) -> None:
    try:
        import sentry_sdk
    except ImportError:
        raise ConfigurationError(
            "SENTRY_DSN is set but sentry-sdk is not installed: pip install 'forgeline[sentry]'"
        ) from None
    sentry_sdk.init(
        environment=os.environ.get("SENTRY_ENVIRONMENT", settings.environment),
        release=f"forgeline@{__version__}",
        # Never ship request bodies, headers with keys, or local variables.
        send_default_pii=False,
        include_local_variables=False,
        max_request_body_size="never",
    )
    logger.info("sentry on", action="telemetry", sentry=True)


def _setup_tracing() -> None:
    try:
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigurationError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed: "
            "pip install 'forgeline[otel]'"
        ) from None
    if isinstance(trace.get_tracer_provider(), TracerProvider):
        return  # already set up in this process
    resource = Resource.create(
        {"service.name": os.environ.get("OTEL_SERVICE_NAME", "forgeline"),
         "service.version": __version__}
    )  # fmt: skip
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    logger.info("tracing on", action="telemetry", otel=True)


def shutdown() -> None:
    """Flush what is buffered (spans, events) before the process exits."""
    if tracing_enabled():
        from opentelemetry import trace

        provider = trace.get_tracer_provider()
        flush = getattr(provider, "shutdown", None)
        if callable(flush):
            flush()
    if sentry_enabled():
        import sentry_sdk

        sentry_sdk.flush(timeout=2)
