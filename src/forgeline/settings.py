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

import limits
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
    db_pool_timeout_s: float = Field(
        default=10.0,
        gt=0,
        description="Longest wait for a free database connection before a request gets 503.",
    )
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
    backend: Literal["builtin", "openai", "transformers"] = Field(
        default="builtin",
        description="builtin: the small model shipped with forgeline (no setup); openai: any "
        "OpenAI-compatible server; transformers: a Hugging Face model folder on disk.",
    )
    builtin_model_path: Path | None = Field(
        default=None,
        description="Folder with model.safetensors and tokenizer.json from `forgeline train`. "
        "Empty: the model shipped with forgeline.",
    )
    builtin_max_concurrency: int = Field(
        default=8,
        ge=1,
        le=256,
        description="Built-in model generations computing at once (one thread each); more "
        "than the cores share them, which keeps every job's first token quick.",
    )
    local_model_path: Path | None = Field(
        default=None, description="Causal language model folder for the transformers backend."
    )
    local_device: Literal["auto", "cpu", "cuda"] = "auto"
    local_max_concurrency: int = Field(default=4, ge=1, le=256)
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
    max_body_bytes: int = Field(
        default=10 * 1024 * 1024, ge=1024, description="Largest request body accepted (413)."
    )
    request_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest a non-streaming request may take (504)."
    )
    allowed_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Browser origins allowed by CORS, comma-separated. '*' is refused in prod.",
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Proxy addresses or networks (CIDR), comma-separated, whose "
        "X-Forwarded-For is believed for the client's IP.",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="`forgeline worker` only: serve /healthz, /readyz and /metrics on this port.",
    )
    metrics_token: SecretStr | None = Field(
        default=None, description="If set, /metrics needs 'Authorization: Bearer <token>'."
    )

    # -- API keys, rate limits, quotas -----------------------------------------
    secret_key: SecretStr | None = Field(
        default=None,
        description="Key of the keyed hash that stores API keys; the same on every replica. "
        "Required in prod; elsewhere, a random one is kept in the data directory.",
    )
    admin_key: SecretStr | None = Field(
        default=None,
        description="An API key accepted as admin, registered at start (for deployments "
        "that inject their first key as a secret).",
    )
    key_cache_s: float = Field(
        default=10.0, ge=0, description="How long a replica trusts a checked key."
    )
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis for rate limits shared by replicas (redis://host:6379/0). "
        "Empty: limits are kept in memory, per process.",
    )
    rate_limit_per_key: str = Field(
        default="600/minute", description="Requests per API key (moving window)."
    )
    rate_limit_per_ip: str = Field(
        default="1200/minute", description="Requests per client IP (moving window)."
    )
    max_active_jobs_per_key: int = Field(
        default=32, ge=1, description="Queued plus running jobs one key may have."
    )
    max_streams_per_key: int = Field(
        default=64, ge=1, description="Open event streams of one key, per replica."
    )
    max_tokens_per_job: int = Field(default=4096, ge=1)
    daily_token_quota: int = Field(
        default=0, ge=0, description="Tokens one key may generate per UTC day; 0: no quota."
    )

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

    @field_validator("pipelines", "allowed_origins", "trusted_proxies", mode="before")
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
        if self.backend == "transformers" and self.local_model_path is None:
            problems.append(
                f"{ENV_PREFIX}LOCAL_MODEL_PATH: required by {ENV_PREFIX}BACKEND=transformers"
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
            if self.secret_key is None:
                problems.append(
                    f"{ENV_PREFIX}SECRET_KEY: required in prod (the same on every replica)"
                )
            if "*" in self.allowed_origins:
                problems.append(f"{ENV_PREFIX}ALLOWED_ORIGINS: '*' is refused in prod")
            for name in ("database_url", "openai_api_key", "secret_key", "admin_key"):
                secret = getattr(self, name)
                if secret is not None and _is_placeholder(secret.get_secret_value(), name):
                    problems.append(f"{ENV_PREFIX}{name.upper()}: holds a placeholder value")
        for name in ("rate_limit_per_key", "rate_limit_per_ip"):
            try:
                limits.parse(getattr(self, name))
            except ValueError:
                problems.append(
                    f"{ENV_PREFIX}{name.upper()}: not a rate like '600/minute': "
                    f"{getattr(self, name)!r}"
                )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                problems.append(
                    f"{ENV_PREFIX}TRUSTED_PROXIES: not an address or network: {proxy!r}"
                )
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
