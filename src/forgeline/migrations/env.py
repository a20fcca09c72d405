"""Alembic environment: runs on the connection forgeline hands it."""

from __future__ import annotations

from alembic import context

from forgeline.db.tables import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations through `forgeline migrate`, which supplies a connection")

context.configure(connection=connection, target_metadata=Base.metadata)
with context.begin_transaction():
    context.run_migrations()
