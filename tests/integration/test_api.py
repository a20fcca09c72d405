"""The HTTP API in-process, on a real database and queue, through httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import datetime as dt
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from forgeline.api.app import create_app
from forgeline.runtime import Runtime
from forgeline.storage import artifact_key
from tests.support.auth import AUTH

JOBS = "/api/v1/jobs"
ERROR_ENVELOPE_KEYS = {"code", "message", "details"}
#: Longest an in-process job may take to finish before the test fails.
JOB_DEADLINE_S = 30.0

Submit = Callable[..., Awaitable[httpx.Response]]


@pytest.fixture
async def client(runtime: Runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the app built on the test's started runtime (no lifespan needed)."""
    app = create_app(runtime.settings, runtime=runtime)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://forgeline.test", headers=AUTH
    ) as http:
        yield http


@pytest.fixture
def submit(client: httpx.AsyncClient) -> Submit:
    """Posts a job (echo by default); ``key`` sets the Idempotency-Key header."""

    async def post(
        pipeline: str = "echo", job_input: Any = None, *, key: str | None = None
    ) -> httpx.Response:
        body = {"pipeline": pipeline, "input": {} if job_input is None else job_input}
        headers = {"Idempotency-Key": key} if key is not None else {}
        return await client.post(JOBS, json=body, headers=headers)

    return post


@pytest.fixture
def submit_ok(submit: Submit) -> Callable[..., Awaitable[dict[str, Any]]]:
    """Posts a job that must be created, and returns its JSON."""

    async def post(pipeline: str = "echo", job_input: Any = None) -> dict[str, Any]:
        response = await submit(pipeline, job_input)
        assert response.status_code == 201, response.text
        job: dict[str, Any] = response.json()
        return job

    return post


def error_of(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert ``response`` is an error envelope with ``status`` and ``code``; return its body."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_ENVELOPE_KEYS
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]
    error: dict[str, Any] = body["error"]
    return error


async def wait_for_final(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    """Poll the job until it is final, failing after JOB_DEADLINE_S."""
    deadline = time.monotonic() + JOB_DEADLINE_S
    while True:
        response = await client.get(f"{JOBS}/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["status"] in {"succeeded", "failed", "cancelled"}:
            return job
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} still {job['status']} after {JOB_DEADLINE_S} s")
        await asyncio.sleep(0.05)


# -- submit and read --------------------------------------------------------


async def test_submit_returns_201_with_location_and_the_queued_job(submit: Submit) -> None:
    """POST /jobs stores and queues the job, answering 201, its Location and its JSON."""
    response = await submit("echo", {"text": "hello"})

    assert response.status_code == 201
    job = response.json()
    assert response.headers["location"] == f"{JOBS}/{job['id']}"
    uuid.UUID(job["id"])
    assert job["pipeline"] == "echo"
    assert job["status"] == "queued"
    assert job["input"] == {"text": "hello"}
    assert job["attempts"] == 0
    assert job["max_attempts"] == 3
    assert job["cancel_on_disconnect"] is False
    assert job["progress"] == 0.0
    assert job["result"] is None
    assert job["error"] is None
    assert job["artifacts"] == []
    assert job["started_at"] is None
    assert job["finished_at"] is None
    assert dt.datetime.fromisoformat(job["created_at"]).tzinfo is not None


async def test_jobs_without_idempotency_key_are_all_created(
    client: httpx.AsyncClient, submit: Submit
) -> None:
    """Jobs submitted without an Idempotency-Key never deduplicate: each is a new job."""
    statuses = [(await submit("echo", {"text": "same"})).status_code for _ in range(3)]

    assert statuses == [201, 201, 201]
    assert len((await client.get(JOBS)).json()["items"]) == 3


async def test_submit_stores_normalised_input(
    submit_ok: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    """The stored input has the pipeline's defaults filled in."""
    job = await submit_ok("story", {"prompt": "a door in the sea"})

    assert job["input"] == {
        "prompt": "a door in the sea",
        "genre": None,
        "max_tokens": 512,
        "temperature": 0.8,
        "seed": None,
    }


async def test_get_returns_the_submitted_job(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """GET /jobs/{id} returns the same job that POST created."""
    created = await submit_ok("echo", {"text": "read me"})

    response = await client.get(f"{JOBS}/{created['id']}")

    assert response.status_code == 200
    assert response.json() == created


@pytest.mark.parametrize("job_id", [str(uuid.UUID(int=1)), "not-a-uuid", "1"])
async def test_unknown_or_malformed_job_id_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    """A job id that matches nothing (or is no UUID at all) is not found, in the envelope."""
    error = error_of(await client.get(f"{JOBS}/{job_id}"), 404, "not_found")

    assert job_id in error["message"]


# -- listing ----------------------------------------------------------------


async def test_list_pages_walk_every_job_once_newest_first(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """Following next_cursor with limit=3 visits all 7 jobs, no duplicates, newest first."""
    created = [(await submit_ok("echo", {"text": str(n)}))["id"] for n in range(7)]

    seen: list[dict[str, Any]] = []
    sizes: list[int] = []
    params: dict[str, Any] = {"limit": 3}
    for _ in range(10):  # bound: 3 pages expected
        response = await client.get(JOBS, params=params)
        assert response.status_code == 200, response.text
        page = response.json()
        seen.extend(page["items"])
        sizes.append(len(page["items"]))
        if page["next_cursor"] is None:
            break
        params = {"limit": 3, "cursor": page["next_cursor"]}

    ids = [job["id"] for job in seen]
    assert sizes == [3, 3, 1]
    assert len(ids) == len(set(ids))
    assert ids == list(reversed(created))


async def test_list_has_no_cursor_when_the_page_holds_the_rest(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """A page exactly as long as what remains ends the walk (no empty last page)."""
    for _ in range(3):
        await submit_ok()

    page = (await client.get(JOBS, params={"limit": 3})).json()

    assert len(page["items"]) == 3
    assert page["next_cursor"] is None


async def test_list_of_no_jobs_is_empty(client: httpx.AsyncClient) -> None:
    """A fresh deployment lists nothing, with no cursor."""
    response = await client.get(JOBS)

    assert response.status_code == 200
    assert response.json() == {"items": [], "next_cursor": None}


async def test_list_filters_by_status(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """``status=`` returns only jobs in that status."""
    queued = [(await submit_ok())["id"] for _ in range(2)]
    cancelled = (await submit_ok())["id"]
    assert (await client.post(f"{JOBS}/{cancelled}/cancel")).status_code == 202

    only_cancelled = (await client.get(JOBS, params={"status": "cancelled"})).json()
    only_queued = (await client.get(JOBS, params={"status": "queued"})).json()
    none_running = (await client.get(JOBS, params={"status": "running"})).json()

    assert [job["id"] for job in only_cancelled["items"]] == [cancelled]
    assert {job["id"] for job in only_queued["items"]} == set(queued)
    assert none_running["items"] == []


async def test_list_filters_by_pipeline(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """``pipeline=`` returns only that pipeline's jobs."""
    story = (await submit_ok("story", {"prompt": "a door"}))["id"]
    await submit_ok("echo")

    page = (await client.get(JOBS, params={"pipeline": "story"})).json()

    assert [job["id"] for job in page["items"]] == [story]


@pytest.mark.parametrize(
    ("params", "loc"),
    [
        ({"limit": 101}, ["query", "limit"]),
        ({"limit": 0}, ["query", "limit"]),
        ({"status": "sleeping"}, ["query", "status"]),
    ],
)
async def test_list_refuses_bad_query_parameters(
    client: httpx.AsyncClient, params: dict[str, Any], loc: list[str]
) -> None:
    """Out-of-range limits and unknown statuses are 422 with the parameter located."""
    error = error_of(await client.get(JOBS, params=params), 422, "invalid_request")

    assert [detail["loc"] for detail in error["details"]] == [loc]


async def test_list_accepts_the_largest_page(client: httpx.AsyncClient) -> None:
    """limit=100 is the maximum and is accepted."""
    assert (await client.get(JOBS, params={"limit": 100})).status_code == 200


@pytest.mark.parametrize("cursor", ["garbage!", "bm90LWEtY3Vyc29y", "MjAyNC0wMS0wMXxub3BlCg=="])
async def test_bad_cursor_is_422_in_the_envelope(client: httpx.AsyncClient, cursor: str) -> None:
    """A cursor not of the documented form is refused as invalid input."""
    error = error_of(await client.get(JOBS, params={"cursor": cursor}), 422, "invalid_request")

    assert error["details"][0]["loc"] == ["query", "cursor"]


# -- refused submissions ----------------------------------------------------


async def test_unknown_pipeline_is_404_listing_known_pipelines(submit: Submit) -> None:
    """Submitting to a pipeline that does not exist names the ones that do."""
    error = error_of(await submit("poem"), 404, "not_found")

    assert "'poem'" in error["message"]
    assert "echo" in error["message"]
    assert "story" in error["message"]
    assert {"echo", "story"} <= set(error["details"]["known"])


async def test_invalid_input_is_422_with_field_errors(submit: Submit) -> None:
    """Input that fails the pipeline's model lists each bad field under error.details."""
    error = error_of(
        await submit("story", {"max_tokens": 0, "colour": "red"}), 422, "invalid_input"
    )

    by_loc = {tuple(detail["loc"]): detail for detail in error["details"]}
    assert set(by_loc) == {("input", "prompt"), ("input", "max_tokens"), ("input", "colour")}
    assert by_loc[("input", "prompt")]["type"] == "missing"
    assert by_loc[("input", "colour")]["type"] == "extra_forbidden"
    assert all({"loc", "msg", "type"} <= set(detail) for detail in error["details"])


async def test_malformed_json_is_400(client: httpx.AsyncClient) -> None:
    """A body that is not JSON is 400 malformed_json, not a validation error."""
    response = await client.post(
        JOBS, content=b'{"pipeline": "echo",', headers={"content-type": "application/json"}
    )

    error = error_of(response, 400, "malformed_json")
    assert error["details"] is None


@pytest.mark.parametrize(
    ("field", "value"), [("owner", "someone-else"), ("status", "succeeded"), ("attempts", 0)]
)
async def test_server_owned_fields_are_refused(
    client: httpx.AsyncClient, field: str, value: Any
) -> None:
    """Unknown body fields (mass assignment of owner, status, attempts) are 422; nothing stored."""
    body = {"pipeline": "echo", "input": {}, field: value}

    error = error_of(await client.post(JOBS, json=body), 422, "invalid_request")

    assert [(d["loc"], d["type"]) for d in error["details"]] == [
        (["body", field], "extra_forbidden")
    ]
    assert (await client.get(JOBS)).json()["items"] == []


@pytest.mark.parametrize(
    "body", [[], {"input": {}}, {"pipeline": ""}, {"pipeline": "echo", "input": "text"}]
)
async def test_ill_shaped_body_is_422(client: httpx.AsyncClient, body: Any) -> None:
    """A body of the wrong shape is a request validation error with details."""
    error = error_of(await client.post(JOBS, json=body), 422, "invalid_request")

    assert error["details"]


# -- cancel -----------------------------------------------------------------


async def test_cancel_queued_job_is_202_and_cancelled(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """A queued job is cancelled at once; reading it back agrees."""
    job = await submit_ok()

    response = await client.post(f"{JOBS}/{job['id']}/cancel")

    assert response.status_code == 202
    assert response.json()["status"] == "cancelled"
    assert response.json()["finished_at"] is not None
    assert (await client.get(f"{JOBS}/{job['id']}")).json()["status"] == "cancelled"


async def test_cancel_finished_job_is_409(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """A job already final cannot be cancelled again."""
    job = await submit_ok()
    await client.post(f"{JOBS}/{job['id']}/cancel")

    error = error_of(await client.post(f"{JOBS}/{job['id']}/cancel"), 409, "conflict")

    assert "cancelled" in error["message"]


@pytest.mark.parametrize("job_id", [str(uuid.UUID(int=2)), "nope"])
async def test_cancel_unknown_job_is_404(client: httpx.AsyncClient, job_id: str) -> None:
    """Cancelling a job that does not exist is not found."""
    error_of(await client.post(f"{JOBS}/{job_id}/cancel"), 404, "not_found")


# -- idempotency ------------------------------------------------------------


async def test_same_idempotency_key_and_body_returns_the_first_job(
    client: httpx.AsyncClient, submit: Submit
) -> None:
    """A repeat with the same key and body is 200 with the first job; no second job exists."""
    first = await submit("echo", {"text": "once"}, key="order-42")
    again = await submit("echo", {"text": "once"}, key="order-42")

    assert first.status_code == 201
    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.headers["location"] == first.headers["location"]
    assert len((await client.get(JOBS)).json()["items"]) == 1


async def test_idempotency_compares_normalised_input(submit: Submit) -> None:
    """Bodies equal after defaults are filled in count as the same request."""
    first = await submit("echo", {}, key="defaults")
    again = await submit("echo", {"text": ""}, key="defaults")

    assert again.status_code == 200
    assert again.json()["id"] == first.json()["id"]


async def test_same_idempotency_key_with_another_body_is_409(submit: Submit) -> None:
    """Reusing a key for a different request is a conflict that names the first job."""
    first = await submit("echo", {"text": "one"}, key="order-43")

    error = error_of(await submit("echo", {"text": "two"}, key="order-43"), 409, "conflict")

    assert "Idempotency-Key" in error["message"]
    assert error["details"] == {"job_id": first.json()["id"]}


async def test_different_idempotency_keys_make_different_jobs(submit: Submit) -> None:
    """The key scopes the deduplication: another key is another job."""
    first = await submit("echo", {"text": "same"}, key="a")
    second = await submit("echo", {"text": "same"}, key="b")

    assert second.status_code == 201
    assert second.json()["id"] != first.json()["id"]


async def test_overlong_idempotency_key_is_422(submit: Submit) -> None:
    """Keys longer than 200 characters are refused as a header validation error."""
    error = error_of(await submit("echo", {}, key="k" * 201), 422, "invalid_request")

    assert error["details"][0]["loc"] == ["header", "idempotency-key"]


# -- artifacts --------------------------------------------------------------


async def test_unknown_artifact_is_404(
    client: httpx.AsyncClient, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """Downloading a name the job never produced is not found."""
    job = await submit_ok()

    error = error_of(await client.get(f"{JOBS}/{job['id']}/artifacts/story.md"), 404, "not_found")

    assert "story.md" in error["message"]


async def test_artifact_of_unknown_job_is_404(client: httpx.AsyncClient) -> None:
    """Downloading from a job that does not exist is not found."""
    error_of(await client.get(f"{JOBS}/{uuid.UUID(int=3)}/artifacts/story.md"), 404, "not_found")


async def test_recorded_artifact_downloads_with_its_metadata(
    client: httpx.AsyncClient,
    runtime: Runtime,
    submit_ok: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    """A stored artifact is listed on the job and streams back with type, size and filename."""
    job = await submit_ok()
    job_id = uuid.UUID(job["id"])
    data = b"# A door\n\nThe sea opened.\n"
    key = artifact_key(job_id, "story.md")
    await runtime.storage.put(key, data)
    await runtime.runner.record_artifact(job_id, "story.md", key, len(data), "text/markdown")

    listed = (await client.get(f"{JOBS}/{job_id}")).json()["artifacts"]
    response = await client.get(listed[0]["url"])

    assert listed == [
        {
            "name": "story.md",
            "size": len(data),
            "content_type": "text/markdown",
            "url": f"{JOBS}/{job_id}/artifacts/story.md",
        }
    ]
    assert response.status_code == 200
    assert response.content == data
    assert response.headers["content-type"].startswith("text/markdown")
    assert response.headers["content-length"] == str(len(data))
    assert response.headers["content-disposition"] == 'attachment; filename="story.md"'


async def test_artifact_missing_from_storage_is_404(
    client: httpx.AsyncClient,
    runtime: Runtime,
    submit_ok: Callable[..., Awaitable[dict[str, Any]]],
) -> None:
    """Metadata without its object is a clean 404, not a broken 200 stream."""
    job_id = uuid.UUID((await submit_ok())["id"])
    key = artifact_key(job_id, "story.md")
    await runtime.runner.record_artifact(job_id, "story.md", key, 10, "text/markdown")

    error_of(await client.get(f"{JOBS}/{job_id}/artifacts/story.md"), 404, "not_found")


# -- envelope for framework errors -----------------------------------------


async def test_unknown_route_is_404_in_the_envelope(client: httpx.AsyncClient) -> None:
    """Starlette's own 404 is shaped like every other error."""
    error_of(await client.get("/api/v1/nothing-here"), 404, "not_found")


async def test_wrong_method_is_405_in_the_envelope(client: httpx.AsyncClient) -> None:
    """A method the route does not allow is 405 in the envelope, keeping the Allow header."""
    response = await client.delete(JOBS)

    error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


# -- pipelines, probes, docs -----------------------------------------------


async def test_pipelines_lists_story_and_echo_with_input_schemas(
    client: httpx.AsyncClient,
) -> None:
    """GET /pipelines names each pipeline with a description and its input's JSON schema."""
    response = await client.get("/api/v1/pipelines")

    assert response.status_code == 200
    items = {item["name"]: item for item in response.json()["items"]}
    assert {"echo", "story"} <= set(items)
    story = items["story"]
    assert story["description"]
    assert story["input_schema"]["type"] == "object"
    assert story["input_schema"]["required"] == ["prompt"]
    assert story["input_schema"]["additionalProperties"] is False
    assert {"prompt", "genre", "max_tokens"} <= set(story["input_schema"]["properties"])
    assert "text" in items["echo"]["input_schema"]["properties"]


async def test_healthz_is_ok(client: httpx.AsyncClient) -> None:
    """Liveness answers 200 without touching dependencies."""
    response = await client.get("/healthz")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


async def test_readyz_is_ready_with_backend_failure_non_critical(
    client: httpx.AsyncClient,
) -> None:
    """Database, queue and storage are ok; the unreachable model server is reported, not fatal."""
    response = await client.get("/readyz")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ready"
    checks = body["checks"]
    for name in ("database", "queue", "storage"):
        assert checks[name]["ok"] is True, checks[name]
        assert checks[name]["critical"] is True
    backend = checks["backend:openai"]
    assert backend["ok"] is False
    assert backend["critical"] is False
    assert "unreachable" in backend["detail"]
    assert all(check["duration_ms"] >= 0 for check in checks.values())


async def test_openapi_documents_the_api(client: httpx.AsyncClient) -> None:
    """/openapi.json lists every route and documents errors with the envelope."""
    response = await client.get("/openapi.json")

    assert response.status_code == 200
    spec = response.json()
    assert {
        JOBS,
        f"{JOBS}/{{job_id}}",
        f"{JOBS}/{{job_id}}/cancel",
        f"{JOBS}/{{job_id}}/artifacts/{{name}}",
        "/api/v1/pipelines",
        "/healthz",
        "/readyz",
    } <= set(spec["paths"])
    create = spec["paths"][JOBS]["post"]["responses"]
    assert create["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorEnvelope")


async def test_docs_page_is_served(client: httpx.AsyncClient) -> None:
    """/docs serves the interactive documentation page."""
    response = await client.get("/docs")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "/openapi.json" in response.text


# -- end to end -------------------------------------------------------------


async def test_echo_job_runs_end_to_end_in_process(
    client: httpx.AsyncClient, runtime: Runtime, submit_ok: Callable[..., Awaitable[dict[str, Any]]]
) -> None:
    """With a worker running, a submitted echo job succeeds with its result; then it is final."""
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_worker(stop))
    try:
        job = await submit_ok("echo", {"text": "round trip"})
        final = await wait_for_final(client, job["id"])
    finally:
        stop.set()
        await asyncio.wait_for(worker, timeout=JOB_DEADLINE_S)

    assert final["status"] == "succeeded", final
    assert final["result"] == {"text": "round trip"}
    assert final["attempts"] == 1
    assert final["progress"] == 1.0
    assert final["error"] is None
    assert final["started_at"] is not None
    assert final["finished_at"] is not None
    error_of(await client.post(f"{JOBS}/{job['id']}/cancel"), 409, "conflict")


@pytest.mark.parametrize(
    ("path", "body"),
    [
        (JOBS, {"pipeline": "echo", "input": {"text": "nul \u0000 inside"}}),
        ("/api/v1/admin/keys", {"name": "nul\u0000name"}),
    ],
)
async def test_values_the_database_cannot_store_are_422(
    client: httpx.AsyncClient, path: str, body: dict[str, Any]
) -> None:
    """A NUL character passes JSON validation but not PostgreSQL: 422, never 500."""
    response = await client.post(path, json=body)

    assert response.status_code == 422
    assert "NUL" in response.json()["error"]["message"]
