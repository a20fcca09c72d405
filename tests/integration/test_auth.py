"""API keys and tenancy over every route of the OpenAPI document.

The route lists come from ``/openapi.json``, so a route added later is
checked for authentication, ownership (BOLA) and admin-only access without
anyone remembering to add it here.
"""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, cast

import httpx
import pytest

from forgeline.api.app import create_app
from forgeline.auth import KeyService, prefix_of, resolve_secret_key
from forgeline.db.engine import SessionFactory
from forgeline.runtime import Runtime
from forgeline.settings import Settings
from forgeline.storage import artifact_key
from tests.support.auth import ADMIN_KEY

JOBS = "/api/v1/jobs"
#: Open to anyone: probes (and the API's own description).
PUBLIC = {"/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/docs/oauth2-redirect",
          "/redoc"}  # fmt: skip
#: Routes whose path parameters name something a key owns.
OWNED = re.compile(r"\{job_id\}")


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def app_client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app without any key."""
    app = create_app(runtime.settings, runtime=runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://forgeline.test") as http:
        yield http


async def new_key(runtime: Runtime, name: str, *, admin: bool = False) -> str:
    return (await runtime.keys.create(name, admin=admin)).token


async def operations(client: httpx.AsyncClient) -> list[tuple[str, str]]:
    """(method, path template) of every documented operation but the public ones."""
    spec = (await client.get("/openapi.json")).json()
    return [
        (method.upper(), path)
        for path, item in spec["paths"].items()
        if path not in PUBLIC
        for method in item
    ]


def fill(path: str, job_id: str) -> str:
    return (
        path.replace("{job_id}", job_id)
        .replace("{name}", "story.md")
        .replace("{key_id}", str(uuid.uuid4()))
    )


async def test_the_openapi_document_covers_the_protected_routes(
    app_client: httpx.AsyncClient,
) -> None:
    """The lists below are not empty: jobs, events, artifacts and admin routes are found."""
    found = {path for _, path in await operations(app_client)}
    assert {JOBS, f"{JOBS}/{{job_id}}", f"{JOBS}/{{job_id}}/events",
            f"{JOBS}/{{job_id}}/artifacts/{{name}}", "/api/v1/admin/keys"} <= found  # fmt: skip


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        bearer("not-a-key"),
        bearer("fl_00000000_" + "x" * 43),  # well formed, unknown
        bearer(ADMIN_KEY[:-1] + "u"),  # a real prefix with a wrong secret
    ],
    ids=["none", "empty", "basic", "malformed", "unknown", "wrong-secret"],
)
async def test_every_route_refuses_a_missing_or_bad_key(
    app_client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    """401 with the envelope and WWW-Authenticate on every protected route."""
    job_id = str(uuid.uuid4())
    for method, path in await operations(app_client):
        response = await app_client.request(method, fill(path, job_id), headers=headers, json={})
        assert response.status_code == 401, (method, path, response.text)
        assert response.json()["error"]["code"] == "unauthorized"
        assert response.headers["www-authenticate"] == "Bearer"


async def test_a_revoked_key_is_refused_at_once_on_every_replica(
    runtime: Runtime, make_settings: Callable[..., Settings], app_client: httpx.AsyncClient
) -> None:
    """Revoking on one replica: the other, which trusted the key a moment ago, refuses it."""
    token = await new_key(runtime, "doomed")
    other = await Runtime.start(make_settings(key_cache_s=3600))
    other.hub.start()
    try:
        other_app = create_app(other.settings, runtime=other)
        transport = httpx.ASGITransport(app=other_app)
        async with httpx.AsyncClient(transport=transport, base_url="http://other.test") as replica:
            assert (await replica.get(JOBS, headers=bearer(token))).status_code == 200
            await asyncio.wait_for(other.hub.connected.wait(), 10)

            await runtime.keys.revoke(prefix_of(token) or "")

            for _ in range(100):
                if (await replica.get(JOBS, headers=bearer(token))).status_code == 401:
                    break
                await asyncio.sleep(0.05)
            else:
                pytest.fail("the other replica still accepts the revoked key after 5 s")
        assert (await app_client.get(JOBS, headers=bearer(token))).status_code == 401
    finally:
        await other.close()


async def test_keys_are_stored_as_keyed_hashes_only(runtime: Runtime) -> None:
    """The database holds the prefix and an HMAC, never the key; another secret key fails."""
    new = await runtime.keys.create("stored")
    async with runtime.engine.connect() as connection:
        rows = (await connection.exec_driver_sql("SELECT prefix, digest FROM api_keys")).all()
    assert all(new.token not in (prefix, digest) for prefix, digest in rows)
    assert (new.key.prefix, runtime.keys.digest(new.token)) in rows

    elsewhere = KeyService(runtime.sessions, b"another secret", cache_s=0)
    assert await elsewhere.authenticate(new.token) is None
    assert await runtime.keys.authenticate(new.token) == new.key


async def test_a_burst_with_one_uncached_key_looks_it_up_once(runtime: Runtime) -> None:
    """Fifty requests at once with a key not yet cached wait on one query, and all pass."""
    new = await runtime.keys.create("burst")
    queries = 0

    def counting_sessions() -> Any:
        nonlocal queries
        queries += 1
        return runtime.sessions()

    keys = KeyService(
        cast(SessionFactory, counting_sessions), resolve_secret_key(runtime.settings), cache_s=60
    )
    found = await asyncio.gather(*(keys.authenticate(new.token) for _ in range(50)))
    assert found == [new.key] * 50
    assert queries == 1
    unknown = new.token[:-4] + "AAAA"
    refused = await asyncio.gather(keys.authenticate(unknown), keys.authenticate(unknown))
    assert list(refused) == [None, None]
    assert queries == 2


async def test_admin_routes_refuse_user_keys(
    runtime: Runtime, app_client: httpx.AsyncClient
) -> None:
    """403 on every admin route for a user key; an admin key manages keys."""
    user = bearer(await new_key(runtime, "user"))
    admin_routes = [(m, p) for m, p in await operations(app_client) if "/admin/" in p]
    assert admin_routes
    for method, path in admin_routes:
        response = await app_client.request(method, fill(path, ""), headers=user, json={})
        assert response.status_code == 403, (method, path, response.text)
        assert response.json()["error"]["code"] == "forbidden"

    admin = bearer(ADMIN_KEY)
    created = await app_client.post("/api/v1/admin/keys", headers=admin, json={"name": "writer"})
    assert created.status_code == 201
    made = created.json()
    assert prefix_of(made["key"]) == made["prefix"]
    listed = (await app_client.get("/api/v1/admin/keys", headers=admin)).json()["items"]
    assert "key" not in listed[-1]
    assert listed[-1]["prefix"] == made["prefix"]
    revoked = await app_client.post(f"/api/v1/admin/keys/{made['id']}/revoke", headers=admin)
    assert revoked.status_code == 200
    assert revoked.json()["revoked_at"] is not None
    assert (await app_client.get(JOBS, headers=bearer(made["key"]))).status_code == 401


async def test_another_key_gets_404_on_everything_a_key_owns(
    runtime: Runtime, app_client: httpx.AsyncClient
) -> None:
    """BOLA: key B on every route naming key A's job (job, cancel, events, artifacts): 404."""
    alice = bearer(await new_key(runtime, "alice"))
    bob = bearer(await new_key(runtime, "bob"))
    submitted = await app_client.post(
        JOBS, headers=alice, json={"pipeline": "echo", "input": {"text": "mine"}}
    )
    assert submitted.status_code == 201
    job_id = submitted.json()["id"]
    key = artifact_key(uuid.UUID(job_id), "story.md")
    await runtime.storage.put(key, b"private")
    await runtime.runner.record_artifact(uuid.UUID(job_id), "story.md", key, 7, "text/markdown")

    owned = [(m, p) for m, p in await operations(app_client) if OWNED.search(p)]
    assert len(owned) >= 4
    for method, path in owned:
        response = await app_client.request(method, fill(path, job_id), headers=bob)
        assert response.status_code == 404, (method, path, response.text)
        assert response.json()["error"]["code"] == "not_found"
    assert (await app_client.get(JOBS, headers=bob)).json()["items"] == []

    # Alice still sees all of it, and her job was not cancelled by Bob's attempt.
    mine = await app_client.get(f"{JOBS}/{job_id}", headers=alice)
    assert mine.json()["status"] == "queued"
    artifact = await app_client.get(f"{JOBS}/{job_id}/artifacts/story.md", headers=alice)
    assert artifact.content == b"private"
    assert [j["id"] for j in (await app_client.get(JOBS, headers=alice)).json()["items"]] == [
        job_id
    ]


@pytest.mark.parametrize(
    "field", [("owner", "someone-else"), ("status", "succeeded"), ("attempts", 0), ("id", "x")]
)
async def test_server_owned_fields_are_refused(
    app_client: httpx.AsyncClient, field: tuple[str, Any]
) -> None:
    """Mass assignment: a body naming a server-owned field is 422, and no job is made."""
    name, value = field
    body = {"pipeline": "echo", "input": {}, name: value}
    response = await app_client.post(JOBS, headers=bearer(ADMIN_KEY), json=body)
    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["loc"][-1] == name
    assert (await app_client.get(JOBS, headers=bearer(ADMIN_KEY))).json()["items"] == []


async def test_replicas_registering_the_same_admin_key_at_once_agree(runtime: Runtime) -> None:
    """FORGELINE_ADMIN_KEY registered by several starting replicas at once: one row, no error."""
    token = "fl_0a0b0c0d_" + "r" * 43
    registered = await asyncio.gather(
        *(runtime.keys.register(token, "injected", admin=True) for _ in range(5))
    )
    assert len({key.id for key in registered}) == 1
    assert [k.prefix for k in await runtime.keys.list()].count("fl_0a0b0c0d") == 1
