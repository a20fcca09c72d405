"""Database engine and session factory on psycopg 3."""

from __future__ import annotations

from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine
from sqlalchemy.ext.asyncio import AsyncSession as AsyncSession

SessionFactory = async_sessionmaker[AsyncSession]


def sqlalchemy_url(conninfo: str) -> str:
    """Turn a libpq URL (``postgresql://…``) into SQLAlchemy's psycopg 3 form."""
    scheme, sep, rest = conninfo.partition("://")
    if not sep or scheme not in {"postgresql", "postgres", "postgresql+psycopg"}:
        raise ValueError(f"not a PostgreSQL URL: {scheme}://…")
    return f"postgresql+psycopg://{rest}"


def create_engine(conninfo: str, *, pool_size: int = 10) -> AsyncEngine:
    """An async engine whose pool checks connections before use.

    ``pool_pre_ping`` lets the service ride out a database restart: a dead
    pooled connection is replaced instead of failing the next request.
    """
    return create_async_engine(
        sqlalchemy_url(conninfo),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=True,
        pool_timeout=10,
    )


def create_session_factory(engine: AsyncEngine) -> SessionFactory:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)
