"""Apply Alembic migrations programmatically (``forgeline migrate``)."""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.ext.asyncio import AsyncEngine

#: Serialises migrations from replicas started at the same moment.
MIGRATION_LOCK_ID = 0x666F7267  # "forg"


def _config() -> Config:
    config = Config()
    config.set_main_option("script_location", "forgeline:migrations")
    return config


def _upgrade(connection: Connection) -> None:
    connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})
    config = _config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _pending(connection: Connection) -> list[str]:
    script = ScriptDirectory.from_config(_config())
    current = set(MigrationContext.configure(connection).get_current_heads())
    heads = set(script.get_heads())
    if current == heads:
        return []
    return [
        rev.revision
        for rev in script.iterate_revisions(tuple(heads), tuple(current) if current else "base")
    ]


async def upgrade(engine: AsyncEngine) -> None:
    """Bring the database schema to the newest revision."""
    async with engine.begin() as connection:
        await connection.run_sync(_upgrade)


async def pending_revisions(engine: AsyncEngine) -> list[str]:
    """Revisions not yet applied; empty when the schema is current."""
    async with engine.connect() as connection:
        return await connection.run_sync(_pending)
