"""Database engine and session factory on psycopg 3."""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

from forgeline.errors import DatabaseUnavailableError

SessionFactory = async_sessionmaker[AsyncSession]
#: Seconds to wait for a new database connection before giving up.
CONNECT_TIMEOUT_S = 5


def sqlalchemy_url(conninfo: str) -> str:
    """Turn a libpq URL (``postgresql://…``) into SQLAlchemy's psycopg 3 form."""
    scheme, sep, rest = conninfo.partition("://")
    if not sep or scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
        raise ValueError(f"not a PostgreSQL URL: {scheme}://…")
    return f"postgresql+psycopg://{rest}"


def create_engine(
    conninfo: str, *, pool_size: int = 10, pool_timeout_s: float = 10.0
) -> AsyncEngine:
    """An async engine whose pool checks connections before use.

    ``pool_pre_ping`` lets the service ride out a database restart: a dead
    pooled connection is replaced instead of failing the next request.
    """
    return create_async_engine(
        sqlalchemy_url(conninfo),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=pool_timeout_s,
        connect_args={"connect_timeout": CONNECT_TIMEOUT_S},
    )


async def check_reachable(engine: AsyncEngine) -> None:
    """Connect once; ``DatabaseUnavailableError`` naming the cause if that fails."""
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except (DBAPIError, OSError) as exc:
        cause = getattr(exc, "orig", None) or exc
        raise DatabaseUnavailableError(f"cannot reach the database: {cause}") from None


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
