"""What every request gets: request ids, caps, headers, compression, CORS, metrics, limits."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

from forgeline.api.app import create_app
from forgeline.db.tables import UsageRow
from forgeline.runtime import Runtime
from forgeline.settings import Settings
from tests.support.auth import AUTH
from tests.support.processes import free_port

JOBS = "/api/v1/jobs"
ClientFactory = Callable[..., Awaitable[httpx.AsyncClient]]


@pytest.fixture
async def make_client(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[ClientFactory]:
    """Clients of apps on runtimes with the given settings (all closed at the end)."""
    opened: list[tuple[Runtime, httpx.AsyncClient]] = []

    async def make(
        *, client_ip: str = "127.0.0.1", headers: dict[str, str] | None = None, **overrides: Any
    ) -> httpx.AsyncClient:
        runtime = await Runtime.start(make_settings(**overrides))
        runtime.hub.start()
        app = create_app(runtime.settings, runtime=runtime)
        transport = httpx.ASGITransport(app=app, client=(client_ip, 40000))
        client = httpx.AsyncClient(
            transport=transport, base_url="http://forgeline.test", headers=headers or AUTH
        )
        opened.append((runtime, client))
        return client

    yield make
    for runtime, client in opened:
        await client.aclose()
        await runtime.close()


@pytest.fixture
async def make_server(
    make_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[httpx.AsyncClient]]]:
    """Clients of real HTTP servers (uvicorn, in this process): streams need one."""
    servers: list[tuple[uvicorn.Server, asyncio.Task[None], httpx.AsyncClient]] = []

    async def make(**overrides: Any) -> httpx.AsyncClient:
        runtime = await Runtime.start(make_settings(**overrides))
        app = create_app(runtime.settings, runtime=runtime)
        port = free_port()
        server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
        )
        task = asyncio.create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
            await asyncio.sleep(0.02)
        client = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=10)
        servers.append((server, task, client))
        return client

    yield make
    for server, task, client in servers:
        await client.aclose()
        server.should_exit = True
        await task


def metric_value(text: str, name: str, labels: dict[str, str]) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


# -- request ids, headers ---------------------------------------------------


async def test_request_ids_are_echoed_or_made(make_client: ClientFactory) -> None:
    """A sane X-Request-ID comes back as sent; a missing or hostile one is replaced."""
    client = await make_client()
    given = await client.get(JOBS, headers={"X-Request-ID": "abc-123"})
    made = await client.get(JOBS)
    hostile_id = "bad id\r" + "y" * 300
    hostile = await client.get(JOBS, headers={"X-Request-ID": hostile_id.replace("\r", ";")})

    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    assert len(hostile.headers["x-request-id"]) == 32


async def test_security_headers_on_every_answer(make_client: ClientFactory) -> None:
    """nosniff, frame denial and referrer policy always; HSTS only over TLS."""
    client = await make_client()
    plain = await client.get("/healthz")
    error = await client.get(f"{JOBS}/{uuid.uuid4()}")
    tls = await client.get("/healthz", headers={"X-Forwarded-Proto": "https"})

    for response in (plain, error, tls):
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
    assert "strict-transport-security" not in plain.headers
    assert tls.headers["strict-transport-security"].startswith("max-age=")


# -- caps -------------------------------------------------------------------


async def test_a_declared_body_over_the_cap_is_413(make_client: ClientFactory) -> None:
    """A Content-Length over FORGELINE_MAX_BODY_BYTES is refused before reading."""
    client = await make_client(max_body_bytes=2048)
    body = b'{"pipeline": "echo", "input": {"text": "' + b"x" * 4096 + b'"}}'
    response = await client.post(JOBS, content=body, headers={"content-type": "application/json"})

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert (await client.get(JOBS)).json()["items"] == []


async def test_a_streamed_body_over_the_cap_is_413(make_client: ClientFactory) -> None:
    """A chunked body with no length is cut off once it passes the cap."""
    client = await make_client(max_body_bytes=2048)

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"pipeline": "echo", "input": {"text": "'
        for _ in range(64):
            yield b"x" * 256
        yield b'"}}'

    response = await client.post(
        JOBS, content=chunks(), headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert (await client.get(JOBS)).json()["items"] == []


async def test_a_request_over_the_time_limit_is_504(make_client: ClientFactory) -> None:
    """A request that cannot reach its answer in FORGELINE_REQUEST_TIMEOUT_S gets 504."""
    client = await make_client(request_timeout_s=0.000_1)
    response = await client.get(JOBS)

    assert response.status_code == 504
    assert response.json()["error"]["code"] == "request_timeout"


async def test_json_is_compressed_but_streams_never(make_server: ClientFactory) -> None:
    """gzip for a large JSON answer; an SSE stream stays uncompressed."""
    client = await make_server()
    job = (await client.post(JOBS, json={"pipeline": "echo", "input": {}})).json()
    spec = await client.get("/openapi.json", headers={"Accept-Encoding": "gzip"})
    assert spec.headers["content-encoding"] == "gzip"
    assert spec.json()["paths"]

    async with client.stream(
        "GET", f"{JOBS}/{job['id']}/events", headers={"Accept-Encoding": "gzip"}
    ) as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        assert "content-encoding" not in stream.headers
        async for line in stream.aiter_lines():
            if line.startswith("event:"):
                assert line == "event: status"
                break


async def test_cors_allows_only_the_configured_origins(make_client: ClientFactory) -> None:
    """A preflight from an allowed origin is answered; another origin gets no grant."""
    client = await make_client(allowed_origins="https://app.example.com")
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization,content-type"}  # fmt: skip
    allowed = await client.options(JOBS, headers={"Origin": "https://app.example.com", **preflight})
    refused = await client.options(JOBS, headers={"Origin": "https://evil.example", **preflight})

    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
    assert "access-control-allow-origin" not in refused.headers


# -- metrics ----------------------------------------------------------------


async def test_metrics_are_labelled_by_route_template(make_client: ClientFactory) -> None:
    """Requests count under their route template, never the raw path; submissions count."""
    client = await make_client()
    before = (await client.get("/metrics")).text
    job_id = str(uuid.uuid4())
    await client.get(f"{JOBS}/{job_id}")
    await client.post(JOBS, json={"pipeline": "echo", "input": {}})
    after = (await client.get("/metrics")).text

    route = {"method": "GET", "route": "/api/v1/jobs/{job_id}", "status": "404"}
    assert metric_value(after, "http_requests_total", route) == (
        metric_value(before, "http_requests_total", route) + 1
    )
    assert job_id not in after
    submitted = {"pipeline": "echo"}
    assert metric_value(after, "forgeline_jobs_submitted_total", submitted) == (
        metric_value(before, "forgeline_jobs_submitted_total", submitted) + 1
    )
    assert metric_value(after, "forgeline_queue_depth", {}) == 1
    assert metric_value(after, "forgeline_db_pool_size", {}) == 10


async def test_metrics_token_protects_metrics(make_client: ClientFactory) -> None:
    """With FORGELINE_METRICS_TOKEN, /metrics needs that bearer (an API key is not enough)."""
    client = await make_client(metrics_token="scrape-token-123")

    assert (await client.get("/metrics")).status_code == 401
    scraped = await client.get("/metrics", headers={"Authorization": "Bearer scrape-token-123"})
    assert scraped.status_code == 200
    assert "http_requests_total" in scraped.text


# -- rate limits and quotas -------------------------------------------------


async def test_the_key_rate_limit_answers_429_with_headers(make_client: ClientFactory) -> None:
    """Over the per-key rate: 429 with Retry-After and RateLimit headers; counted."""
    client = await make_client(rate_limit_per_key="3/minute")
    answers = [await client.get(JOBS) for _ in range(4)]

    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-limit"] == "3"
    assert answers[0].headers["ratelimit-remaining"] == "2"
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 0 < int(refused.headers["retry-after"]) <= 60
    assert refused.headers["ratelimit-remaining"] == "0"
    assert metric_value((await client.get("/metrics")).text, "forgeline_ratelimit_rejections_total",
                        {}) >= 1  # fmt: skip


async def test_a_spoofed_forwarded_for_does_not_change_the_bucket(
    make_client: ClientFactory,
) -> None:
    """From an untrusted peer, X-Forwarded-For is ignored: one IP, one bucket."""
    client = await make_client(rate_limit_per_ip="2/minute", client_ip="203.0.113.9")
    codes = [
        (await client.get(JOBS, headers={"X-Forwarded-For": f"198.51.100.{i}"})).status_code
        for i in range(3)
    ]
    assert codes == [200, 200, 429]


async def test_a_trusted_proxy_forwards_the_client_ip(make_client: ClientFactory) -> None:
    """Behind a trusted proxy, each forwarded client has its own bucket."""
    client = await make_client(
        rate_limit_per_ip="2/minute", client_ip="10.0.0.5", trusted_proxies="10.0.0.0/8"
    )
    first = [
        (await client.get(JOBS, headers={"X-Forwarded-For": "198.51.100.1"})).status_code
        for _ in range(3)
    ]
    other = await client.get(JOBS, headers={"X-Forwarded-For": "6.6.6.6, 198.51.100.2"})
    assert first == [200, 200, 429]
    assert other.status_code == 200


async def test_active_jobs_per_key_are_capped(make_client: ClientFactory) -> None:
    """Queued plus running jobs of one key stop at the cap, even when sent at once."""
    client = await make_client(max_active_jobs_per_key=3)
    answers = await asyncio.gather(
        *(client.post(JOBS, json={"pipeline": "echo", "input": {}}) for _ in range(8))
    )
    codes = sorted(r.status_code for r in answers)
    assert codes == [201] * 3 + [429] * 5
    refused = next(r for r in answers if r.status_code == 429)
    assert "3" in refused.json()["error"]["message"]
    assert len((await client.get(JOBS)).json()["items"]) == 3


async def test_max_tokens_over_the_cap_is_422(make_client: ClientFactory) -> None:
    """A job asking for more tokens than one job may generate is refused, naming the cap."""
    client = await make_client(max_tokens_per_job=100)
    body = {"pipeline": "story", "input": {"prompt": "a door in the sea", "max_tokens": 101}}
    response = await client.post(JOBS, json=body)

    assert response.status_code == 422
    assert "100" in response.json()["error"]["message"]


async def test_the_daily_token_quota_stops_new_jobs(
    make_client: ClientFactory, make_settings: Callable[..., Settings]
) -> None:
    """Once a key's completion tokens today reach the quota, its submissions get 429."""
    client = await make_client(daily_token_quota=1000)
    job = (await client.post(JOBS, json={"pipeline": "echo", "input": {}})).json()
    runtime = await Runtime.start(make_settings())
    try:
        owner = (await runtime.keys.authenticate(AUTH["Authorization"].split()[1])).owner  # type: ignore[union-attr]
        async with runtime.sessions.begin() as session:
            now = dt.datetime.now(dt.UTC)
            usage = UsageRow(job_id=uuid.UUID(job["id"]), owner=owner, prompt_tokens=5,
                             completion_tokens=1000, created_at=now)  # fmt: skip
            session.add(usage)
    finally:
        await runtime.close()
    response = await client.post(JOBS, json={"pipeline": "echo", "input": {}})

    assert response.status_code == 429
    assert "today" in response.json()["error"]["message"]


async def test_open_streams_per_key_are_capped(make_server: ClientFactory) -> None:
    """One stream more than the cap is refused with 429 while the others stay open."""
    client = await make_server(max_streams_per_key=1)
    job = (await client.post(JOBS, json={"pipeline": "echo", "input": {}})).json()
    async with client.stream("GET", f"{JOBS}/{job['id']}/events") as first:
        assert first.status_code == 200
        lines = first.aiter_lines()
        while not (await anext(lines)).startswith("event:"):
            pass
        second = await client.get(f"{JOBS}/{job['id']}/events")
        assert second.status_code == 429
        assert second.json()["error"]["code"] == "rate_limited"


async def test_every_database_connection_busy_is_503_then_served(
    make_settings: Callable[..., Settings],
) -> None:
    """Overload is the server's 503 with Retry-After, never a 500; a freed connection serves."""
    runtime = await Runtime.start(make_settings(db_pool_size=1, db_pool_timeout_s=0.2))
    app = create_app(runtime.settings, runtime=runtime)
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
    try:
        async with httpx.AsyncClient(
            transport=transport, base_url="http://forgeline.test", headers=AUTH
        ) as client:
            # The pool's one connection and its one overflow, both held.
            async with runtime.engine.connect(), runtime.engine.connect():
                busy = await client.post(JOBS, json={"pipeline": "echo", "input": {}})
            assert busy.status_code == 503
            assert busy.headers["Retry-After"] == "1"
            assert busy.json()["error"]["code"] == "server_busy"

            served = await client.post(JOBS, json={"pipeline": "echo", "input": {}})
            assert served.status_code == 201
            assert len((await client.get(JOBS)).json()["items"]) == 1
    finally:
        await runtime.close()
