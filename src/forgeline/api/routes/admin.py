"""``/api/v1/admin``: API key management, for admin keys only."""

from __future__ import annotations

import datetime as dt
import uuid

from fastapi import APIRouter, Depends, status
from pydantic import BaseModel, ConfigDict, Field

from forgeline.api.deps import RuntimeDep, require_admin
from forgeline.api.schemas import ErrorEnvelope
from forgeline.auth import ApiKey

router = APIRouter(
    prefix="/api/v1/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={
        401: {"model": ErrorEnvelope, "description": "Missing or invalid API key."},
        403: {"model": ErrorEnvelope, "description": "Not an admin key."},
    },
)


class KeyCreate(BaseModel):
    """A key to make."""

    # strict: an admin flag of 1 or "yes" is refused, not read as true.
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=100, pattern=r"\S", examples=["blog-writer"])
    admin: bool = False


class KeyOut(BaseModel):
    """A key, without its secret."""

    id: uuid.UUID
    name: str
    prefix: str
    admin: bool
    created_at: dt.datetime
    revoked_at: dt.datetime | None

    @classmethod
    def from_key(cls, key: ApiKey) -> KeyOut:
        return cls.model_validate(key, from_attributes=True)


class NewKeyOut(KeyOut):
    """A key just made: ``key`` is shown this once and never again."""

    key: str


class KeyList(BaseModel):
    """Every key."""

    items: list[KeyOut]


@router.post(
    "/keys",
    status_code=status.HTTP_201_CREATED,
    response_model=NewKeyOut,
    responses={
        400: {"model": ErrorEnvelope, "description": "Malformed JSON."},
        422: {"model": ErrorEnvelope, "description": "Invalid request."},
    },
)
async def create_key(body: KeyCreate, runtime: RuntimeDep) -> NewKeyOut:
    """Make a key. Its full text is in this response only."""
    new = await runtime.keys.create(body.name, admin=body.admin)
    return NewKeyOut(**KeyOut.from_key(new.key).model_dump(), key=new.token)


@router.get("/keys", response_model=KeyList)
async def list_keys(runtime: RuntimeDep) -> KeyList:
    """Every key, revoked ones included, oldest first."""
    return KeyList(items=[KeyOut.from_key(key) for key in await runtime.keys.list()])


@router.post(
    "/keys/{key_id}/revoke",
    response_model=KeyOut,
    responses={404: {"model": ErrorEnvelope, "description": "No such key."}},
)
async def revoke_key(key_id: uuid.UUID, runtime: RuntimeDep) -> KeyOut:
    """Revoke a key; every replica refuses it from now on."""
    return KeyOut.from_key(await runtime.keys.revoke(str(key_id)))
