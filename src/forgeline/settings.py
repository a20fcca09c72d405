"""Typed settings, read from ``FORGELINE_*`` variables and a ``.env`` file.

One class, built by :func:`get_settings` and passed down; nothing reads the
environment at import time. Invalid settings raise :class:`ConfigurationError`
with one line per problem, each naming the variable to fix.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import platformdirs
from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from forgeline.errors import ConfigurationError

ENV_PREFIX = "FORGELINE_"
#: Values that are examples, never real secrets; refused in ``prod``.
PLACEHOLDER_SECRETS = frozenset({"", "changeme", "change-me", "secret", "password", "example"})
#: Hosted model services that refuse requests without an API key.
HOSTS_NEEDING_A_KEY = ("api.openai.com", "generativelanguage.googleapis.com")


def _default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("forgeline", appauthor=False))


class Settings(BaseSettings):
    """Every knob forgeline has. See docs for the meaning of each variable."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        # An empty variable means "unset" (FORGELINE_DATABASE_URL= → embedded).
        env_ignore_empty=True,
        validate_default=True,
    )

    environment: Literal["dev", "staging", "prod"] = "dev"
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    # -- data ---------------------------------------------------------------
    database_url: SecretStr | None = Field(
        default=None,
        description="PostgreSQL URL (postgresql://user:pass@host/db). Empty: embedded server.",
    )
    data_dir: Path = Field(default_factory=_default_data_dir)
    db_pool_size: int = Field(default=10, ge=1, le=200)
    auto_migrate: bool | None = Field(
        default=None,
        description="Apply migrations at start. Default: on for the embedded database only.",
    )

    # -- storage ------------------------------------------------------------
    storage_url: str | None = Field(
        default=None,
        description="Object storage URL: file:///path, s3://bucket/prefix, gs://bucket. "
        "Empty: a folder in the data directory.",
    )

    # -- model backend ------------------------------------------------------
    backend: Literal["openai"] = "openai"
    openai_base_url: str = "http://localhost:11434/v1"
    openai_api_key: SecretStr | None = None
    openai_model: str = "llama3.2"
    backend_connect_timeout_s: float = Field(default=5.0, gt=0)
    backend_timeout_s: float = Field(default=120.0, gt=0)
    backend_max_concurrency: int = Field(default=16, ge=1)
    backend_max_retries: int = Field(default=2, ge=0, le=10)

    # -- HTTP ---------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)

    # -- worker -------------------------------------------------------------
    worker_concurrency: int = Field(default=8, ge=1, le=1000)
    max_attempts: int = Field(default=3, ge=1, le=100)
    drain_timeout_s: float = Field(default=20.0, ge=0)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    stall_threshold_s: float = Field(default=45.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    retry_backoff_s: float = Field(default=2.0, ge=0)
    event_retention_s: float = Field(
        default=7 * 24 * 3600.0,
        gt=0,
        description="Streamed events of finished jobs are compacted after this long.",
    )

    # -- extension ----------------------------------------------------------
    pipelines: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra pipelines by import path, comma-separated (pkg.module:Class).",
    )

    @field_validator("pipelines", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> Settings:
        problems: list[str] = []
        # Procrastinate stops a draining worker's heartbeat, so a stall threshold
        # below the drain budget would let a sweeper steal a job still running.
        if self.stall_threshold_s <= self.drain_timeout_s + 2 * self.heartbeat_interval_s:
            problems.append(
                f"{ENV_PREFIX}STALL_THRESHOLD_S: must exceed drain timeout plus two "
                f"heartbeats ({self.drain_timeout_s + 2 * self.heartbeat_interval_s:g} s)"
            )
        host = urlsplit(self.openai_base_url).hostname or ""
        if not host:
            problems.append(f"{ENV_PREFIX}OPENAI_BASE_URL: not a URL: {self.openai_base_url!r}")
        elif host.endswith(HOSTS_NEEDING_A_KEY) and self.openai_api_key is None:
            problems.append(f"{ENV_PREFIX}OPENAI_API_KEY: required by {host}")
        if self.environment == "prod":
            if self.database_url is None:
                problems.append(
                    f"{ENV_PREFIX}DATABASE_URL: required in prod (the embedded database "
                    "is for development)"
                )
            for name in ("database_url", "openai_api_key"):
                secret = getattr(self, name)
                if secret is not None and _is_placeholder(secret.get_secret_value(), name):
                    problems.append(f"{ENV_PREFIX}{name.upper()}: holds a placeholder value")
        if problems:
            raise ValueError("\n".join(problems))
        return self

    # -- derived values -----------------------------------------------------
    @property
    def embedded_database(self) -> bool:
        """True when forgeline runs its own PostgreSQL from the pgserver wheel."""
        return self.database_url is None

    @property
    def should_auto_migrate(self) -> bool:
        """Whether to apply migrations at start (embedded: yes; elsewhere: when asked)."""
        return self.embedded_database if self.auto_migrate is None else self.auto_migrate

    @property
    def effective_storage_url(self) -> str:
        """The storage URL, defaulting to a folder in the data directory."""
        return self.storage_url or (self.data_dir / "artifacts").resolve().as_uri()

    def redacted(self) -> dict[str, str]:
        """Every setting as text, secrets replaced by ``**********``."""
        shown: dict[str, str] = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                text = "**********"
            elif value is None:
                text = "(unset)"
            else:
                text = str(value)
            shown[f"{ENV_PREFIX}{name.upper()}"] = text
        shown[f"{ENV_PREFIX}STORAGE_URL"] = self.effective_storage_url
        return shown


def _is_placeholder(value: str, name: str) -> bool:
    if name == "database_url":
        password = urlsplit(value).password
        return password is not None and password.lower() in PLACEHOLDER_SECRETS
    return value.lower() in PLACEHOLDER_SECRETS


def is_loopback_url(url: str) -> bool:
    """True when ``url`` points at this machine."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def get_settings(**overrides: object) -> Settings:
    """Build settings from the environment, ``.env`` and ``overrides``.

    Raises :class:`ConfigurationError` whose message has one line per problem,
    each starting with the variable's name.
    """
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines: list[str] = []
    for error in exc.errors(include_url=False):
        if error["loc"]:
            field = str(error["loc"][0])
            lines.append(f"{ENV_PREFIX}{field.upper()}: {error['msg']}")
        else:
            # Cross-field checks already name their variables, one per line.
            lines.extend(str(error["msg"]).removeprefix("Value error, ").splitlines())
    return "\n".join(lines)
