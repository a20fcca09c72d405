"""A PostgreSQL server for tests, and a fresh database per test.

``FORGELINE_TEST_DATABASE_URL`` names an admin URL of a server to use. Without
it, the machine's own server on localhost:5432 is used when it answers, and
otherwise a private server from the pgserver wheel, so the suite runs on a
machine with nothing but Python.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

from forgeline.db import migrate
from forgeline.db.embedded import start_embedded_postgres
from forgeline.db.engine import create_engine

LOCAL_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


def find_admin_url() -> str:
    """An admin URL of a running server, starting a private one if needed."""
    configured = os.environ.get("FORGELINE_TEST_DATABASE_URL")
    if configured:
        return configured
    try:
        with psycopg.connect(LOCAL_ADMIN_URL, connect_timeout=2) as connection:
            connection.execute("SELECT 1")
        return LOCAL_ADMIN_URL
    except psycopg.OperationalError:
        data_dir = Path(tempfile.mkdtemp(prefix="forgeline-test-pg-"))
        return start_embedded_postgres(data_dir)


class DatabaseFactory:
    """Creates migrated databases quickly by cloning one migrated template."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.template = f"fl_template_{uuid.uuid4().hex[:8]}"
        self._created: list[str] = []
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self.template)))
        asyncio.run(self._migrate(self.url_of(self.template)))

    @staticmethod
    async def _migrate(url: str) -> None:
        engine = create_engine(url, pool_size=1)
        try:
            await migrate.upgrade(engine)
        finally:
            await engine.dispose()

    def url_of(self, name: str) -> str:
        """The URL of database ``name`` on the test server."""
        base, _, query = self.admin_url.partition("?")
        prefix = base.rsplit("/", 1)[0]
        return f"{prefix}/{name}" + (f"?{query}" if query else "")

    def create(self) -> str:
        """A new database with the current schema; returns its URL."""
        name = f"fl_test_{uuid.uuid4().hex[:12]}"
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self.template)
            )
        )
        self._created.append(name)
        return self.url_of(name)

    def drop_all(self) -> None:
        """Drop every database this factory made."""
        for name in [*self._created, self.template]:
            self._execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(statement)
