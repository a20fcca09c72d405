"""forgeline's error hierarchy.

Adapters translate driver and SDK errors into these at their boundary, so code
above them (services, pipelines, routes) never catches ``psycopg`` or ``aiohttp``
exceptions. Each error carries a stable ``code`` that reaches clients in the
JSON error envelope and in a failed job's ``error.code``.
"""

from __future__ import annotations

from typing import Any


class ForgelineError(Exception):
    """Base of every error forgeline raises on purpose."""

    code: str = "internal_error"
    #: Whether a job that failed with this error may be tried again.
    retryable: bool = False

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class ConfigurationError(ForgelineError):
    """Settings are invalid or inconsistent."""

    code = "configuration_error"


class UnauthorizedError(ForgelineError):
    """No API key, a malformed one, or one that is unknown or revoked."""

    code = "unauthorized"


class ForbiddenError(ForgelineError):
    """A valid key that may not do this (an admin route with a user key)."""

    code = "forbidden"


class RateLimitedError(ForgelineError):
    """Too many requests or jobs, or a quota used up; ``retry_after_s`` says when to retry."""

    code = "rate_limited"

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        headers: dict[str, str] | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message, details=details)
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class NotFoundError(ForgelineError):
    """A job, pipeline or artifact does not exist (or is not the caller's)."""

    code = "not_found"


class ConflictError(ForgelineError):
    """The request conflicts with the current state (finished job, reused key)."""

    code = "conflict"


class InvalidInputError(ForgelineError):
    """Input that passed the schema but cannot be used."""

    code = "invalid_input"


class BackendError(ForgelineError):
    """A model backend failed in a way that retrying will not fix."""

    code = "backend_error"


class BackendUnavailableError(BackendError):
    """A model backend could not be reached, was overloaded or timed out."""

    code = "backend_unavailable"
    retryable = True


class ModelFileError(BackendError):
    """A local model's weights or tokenizer file is missing or damaged.

    The message names the file, so the fix (reinstall, retrain, point the
    setting elsewhere) is obvious.
    """

    code = "model_file_error"


class StorageError(ForgelineError):
    """Object storage refused or failed an operation."""

    code = "storage_error"
    retryable = True


class DatabaseUnavailableError(ForgelineError):
    """The database could not be reached."""

    code = "database_unavailable"
    retryable = True
