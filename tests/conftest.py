"""Fixtures shared by every tier: a PostgreSQL server, fresh databases, settings."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forgeline.runtime import Runtime
from forgeline.settings import Settings, get_settings
from tests.support.auth import ADMIN_KEY, SECRET_KEY
from tests.support.postgres import DatabaseFactory, find_admin_url

#: Timings shrunk so recovery paths run in seconds, still consistent with each other.
FAST_TIMINGS: dict[str, Any] = {
    "drain_timeout_s": 2.0,
    "heartbeat_interval_s": 0.5,
    "stall_threshold_s": 4.0,
    "sweep_interval_s": 0.5,
    "retry_backoff_s": 0.0,
}


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No test reads the developer's FORGELINE_* variables or .env file."""
    for name in list(os.environ):
        if name.startswith("FORGELINE_") and name != "FORGELINE_TEST_DATABASE_URL":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def databases() -> Iterator[DatabaseFactory]:
    """Makes migrated databases on the test server."""
    factory = DatabaseFactory(find_admin_url())
    yield factory
    factory.drop_all()


@pytest.fixture
def database_url(databases: DatabaseFactory) -> str:
    """A fresh, migrated database for this test."""
    return databases.create()


@pytest.fixture
def make_settings(database_url: str, tmp_path: Path) -> Callable[..., Settings]:
    """Builds settings on this test's database and folders, with fast timings."""

    def make(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "database_url": database_url,
            "data_dir": tmp_path / "data",
            "storage_url": (tmp_path / "artifacts").as_uri(),
            # The tests of jobs and pipelines talk to an OpenAI-compatible server.
            "backend": "openai",
            "openai_base_url": "http://127.0.0.1:9/v1",
            "backend_connect_timeout_s": 0.5,
            "backend_max_retries": 0,
            "admin_key": ADMIN_KEY,
            "secret_key": SECRET_KEY,
            **FAST_TIMINGS,
        }
        values.update(overrides)
        return get_settings(**values)

    return make


@pytest.fixture
async def runtime(make_settings: Callable[..., Settings]) -> AsyncIterator[Runtime]:
    """A started runtime on a fresh database (no worker running)."""
    started = await Runtime.start(make_settings())
    yield started
    await started.close()
