"""API keys: shown once, stored as a keyed hash, found by a visible prefix.

A key reads ``fl_1a2b3c4d_<43 random characters>``. The first part, the
prefix, is stored in the clear so a key can be named in lists and logs and
found with one indexed lookup; the whole key is stored only as
HMAC-SHA256 under ``FORGELINE_SECRET_KEY``, so a copy of the database alone
does not let anyone call the API. Each replica remembers checked keys for
``FORGELINE_KEY_CACHE_S``; a revocation is announced on ``forgeline_keys``
so every listening replica forgets the key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select, text, update
from sqlalchemy.exc import IntegrityError

from forgeline.db.engine import SessionFactory
from forgeline.db.tables import ApiKeyRow
from forgeline.errors import ConfigurationError, InvalidInputError, NotFoundError
from forgeline.events.log import REVOKED_CHANNEL
from forgeline.settings import Settings

KEY_PATTERN = re.compile(r"(fl_[0-9a-f]{8})_[A-Za-z0-9_-]{43}")
SECRET_KEY_FILE = "secret_key"  # noqa: S105 - a file name, not a secret
ADMIN_KEY_FILE = "admin_key"
LOCAL_ADMIN_NAME = "local-admin"


@dataclass(frozen=True)
class ApiKey:
    """A key as the API shows it: never the secret part."""

    id: uuid.UUID
    name: str
    prefix: str
    admin: bool
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @property
    def owner(self) -> str:
        """The owner recorded on the jobs this key makes."""
        return str(self.id)

    @classmethod
    def from_row(cls, row: ApiKeyRow) -> ApiKey:
        return cls(row.id, row.name, row.prefix, row.admin, row.created_at, row.revoked_at)


@dataclass(frozen=True)
class NewKey:
    """A key just created: the only time its full text exists outside the client."""

    key: ApiKey
    token: str


def new_token() -> str:
    """A fresh random key."""
    return f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"


def prefix_of(token: str) -> str | None:
    """The visible prefix of a well-formed key, else None."""
    match = KEY_PATTERN.fullmatch(token)
    return match.group(1) if match else None


def resolve_secret_key(settings: Settings) -> bytes:
    """``FORGELINE_SECRET_KEY``, or one kept in the data directory (not in prod)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    if settings.environment == "prod":  # the settings check refuses this already
        raise ConfigurationError("FORGELINE_SECRET_KEY: required in prod")
    path = settings.data_dir / SECRET_KEY_FILE
    if not path.exists():
        write_private(path, secrets.token_urlsafe(48))
    return path.read_text().strip().encode()


def write_private(path: Path, content: str) -> None:
    """Create ``path`` readable by its owner only (mode 0600), never overwriting."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return  # another process of this data directory got there first
    with os.fdopen(fd, "w") as file:
        file.write(content + "\n")


class KeyService:
    """Creates, lists, revokes and checks API keys."""

    def __init__(self, sessions: SessionFactory, secret_key: bytes, *, cache_s: float) -> None:
        self.sessions = sessions
        self._secret_key = secret_key
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, ApiKey]] = {}
        #: Lookups under way, by digest: a burst of requests with one uncached
        #: key waits on one query instead of each sending its own.
        self._lookups: dict[str, asyncio.Future[ApiKey | None]] = {}

    def digest(self, token: str) -> str:
        """The keyed hash stored for ``token``."""
        return hmac.new(self._secret_key, token.encode(), hashlib.sha256).hexdigest()

    async def create(self, name: str, *, admin: bool = False) -> NewKey:
        """A new key; its full text is in the result and nowhere else."""
        name = name.strip()
        if not name or len(name) > 100:
            raise InvalidInputError("a key's name must be 1 to 100 characters")
        token = new_token()
        return NewKey(await self._store(token, name, admin=admin), token)

    async def register(self, token: str, name: str, *, admin: bool) -> ApiKey:
        """Accept a key made elsewhere (an injected secret); idempotent."""
        prefix = prefix_of(token)
        if prefix is None:
            raise ConfigurationError(
                "FORGELINE_ADMIN_KEY: not a forgeline key (fl_xxxxxxxx_...; make one with "
                "`forgeline keys create`)"
            )
        async with self.sessions() as session:
            row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix))
        if row is not None:
            if not hmac.compare_digest(row.digest, self.digest(token)):
                raise ConfigurationError(
                    f"FORGELINE_ADMIN_KEY: another key with prefix {prefix} is stored"
                )
            return ApiKey.from_row(row)
        try:
            return await self._store(token, name, admin=admin)
        except IntegrityError:
            # Another replica starting at the same moment registered it first.
            return await self.register(token, name, admin=admin)

    async def _store(self, token: str, name: str, *, admin: bool) -> ApiKey:
        async with self.sessions.begin() as session:
            row = ApiKeyRow(
                id=uuid.uuid4(),
                name=name,
                prefix=prefix_of(token),
                digest=self.digest(token),
                admin=admin,
            )
            session.add(row)
        return ApiKey.from_row(row)

    async def count(self) -> int:
        """How many keys exist, revoked ones included."""
        async with self.sessions() as session:
            return int(await session.scalar(select(func.count()).select_from(ApiKeyRow)) or 0)

    async def list(self) -> list[ApiKey]:
        """Every key, oldest first."""
        async with self.sessions() as session:
            rows = await session.scalars(select(ApiKeyRow).order_by(ApiKeyRow.created_at))
            return [ApiKey.from_row(row) for row in rows]

    async def revoke(self, key: str) -> ApiKey:
        """Revoke the key with this id or prefix; every replica forgets it at once."""
        condition = ApiKeyRow.prefix == key
        with contextlib.suppress(ValueError):
            condition = ApiKeyRow.id == uuid.UUID(key)
        async with self.sessions.begin() as session:
            row = await session.scalar(
                update(ApiKeyRow)
                .where(condition)
                .values(revoked_at=func.coalesce(ApiKeyRow.revoked_at, func.now()))
                .returning(ApiKeyRow)
            )
            if row is None:
                raise NotFoundError(f"no key {key!r}")
            await session.execute(
                text("SELECT pg_notify(:channel, :prefix)"),
                {"channel": REVOKED_CHANNEL, "prefix": row.prefix},
            )
        self.forget(row.prefix)
        return ApiKey.from_row(row)

    async def authenticate(self, token: str) -> ApiKey | None:
        """The live key ``token`` is, or None (malformed, unknown or revoked)."""
        prefix = prefix_of(token)
        if prefix is None:
            return None
        digest = self.digest(token)
        cached = self._cache.get(digest)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        lookup = self._lookups.get(digest)
        if lookup is None:
            lookup = asyncio.ensure_future(self._look_up(prefix, digest))
            self._lookups[digest] = lookup
            lookup.add_done_callback(lambda _: self._lookups.pop(digest, None))
        # Shielded: one waiter giving up must not cancel the others' answer.
        return await asyncio.shield(lookup)

    async def _look_up(self, prefix: str, digest: str) -> ApiKey | None:
        async with self.sessions() as session:
            row = await session.scalar(select(ApiKeyRow).where(ApiKeyRow.prefix == prefix))
        key = None
        if row is not None and row.revoked_at is None and hmac.compare_digest(row.digest, digest):
            key = ApiKey.from_row(row)
        if key is not None and self.cache_s > 0:
            # Only live keys are remembered: a key created on another replica
            # works at once, and made-up keys cannot fill the cache.
            if len(self._cache) > 10_000:  # a flood of made-up keys must not grow memory
                self._cache.clear()
            self._cache[digest] = (time.monotonic() + self.cache_s, key)
        return key

    def forget(self, prefix: str) -> None:
        """Drop cached checks of the key with ``prefix`` (it was revoked)."""
        self._cache = {d: entry for d, entry in self._cache.items() if entry[1].prefix != prefix}
