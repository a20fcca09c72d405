"""Schemathesis against the OpenAPI document of a real server: every default check passes.

Schemathesis reads the OpenAPI document and sends each operation generated
requests, valid and invalid, with the admin key (and without it). Its checks then hold the
answers to the document: no 5xx, only documented status codes, headers and
content types, bodies that match their schemas, invalid input refused and
valid input accepted.

The server is uvicorn on a real socket (the event stream needs one), run in
a thread with its own event loop, since schemathesis calls it synchronously.
A finished job is seeded, and half the valid requests naming a job name it,
so reading, cancelling and streaming a real job are checked too (its stream
ends, being finished); the other half name jobs that do not exist.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from hypothesis import strategies as st
from schemathesis import GenerationMode

from forgeline.api.app import create_app
from forgeline.api.openapi import API_KEY_SCHEME
from forgeline.runtime import Runtime
from forgeline.settings import Settings, get_settings
from tests.support.auth import ADMIN_KEY, AUTH, SECRET_KEY
from tests.support.postgres import DatabaseFactory
from tests.support.processes import free_port

JOBS = "/api/v1/jobs"
#: Generated cases per operation and phase: enough to reach odd input, bounded in time.
MAX_EXAMPLES = 30
#: Longest the server may take to start or stop.
SERVER_DEADLINE_S = 30.0

#: Longest one request may take: a stream that does not end fails the test.
REQUEST_TIMEOUT_S = 10.0

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261123,
        # Through the document's security scheme, so the check that the API
        # refuses a request without a valid key can take it away.
        "auth": {"openapi": {API_KEY_SCHEME: {"bearer": ADMIN_KEY}}},
        "request-timeout": REQUEST_TIMEOUT_S,
        "generation": {
            "max-examples": MAX_EXAMPLES,
            "deterministic": True,
            # PostgreSQL cannot store NUL (\u0000) in text or JSON, so forgeline
            # refuses it with 422 by design (test_api.py checks that answer);
            # a schema cannot say "any string but NUL" for every pipeline input.
            "allow-x00": False,
        },
    }
)
#: The id of the finished job the server fixture seeds, for the hook below.
SEEDED: dict[str, str] = {}


class ThreadedServer:
    """forgeline on uvicorn, in a thread with its own event loop."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.started = threading.Event()
        self.failure: BaseException | None = None
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, name="forgeline-server", daemon=True)

    @property
    def url(self) -> str:
        """Where the server listens."""
        return f"http://127.0.0.1:{self.port}"

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported to the test's thread
            self.failure = exc
        finally:
            self.started.set()

    async def _serve(self) -> None:
        runtime = await Runtime.start(self.settings)
        app = create_app(self.settings, runtime=runtime)
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_config=None)
        self._server = uvicorn.Server(config)
        serving = asyncio.create_task(self._server.serve())
        while not self._server.started and not serving.done():  # noqa: ASYNC110 - no event to wait on
            await asyncio.sleep(0.02)
        self.started.set()
        await serving

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        if not self.started.wait(SERVER_DEADLINE_S) or self.failure is not None:
            raise RuntimeError(f"the server did not start: {self.failure!r}")
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(SERVER_DEADLINE_S)


@pytest.fixture(scope="module")
def server(
    databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ThreadedServer]:
    """One live server for every operation, on a fresh database.

    Rate limits are raised out of reach: hundreds of requests a minute come
    from one key here, and a 429 would hide the answer under test.
    """
    folder = tmp_path_factory.mktemp("openapi")
    with pytest.MonkeyPatch.context() as env:
        # The same isolation as every test: no FORGELINE_* variable, no .env file.
        for name in [n for n in os.environ if n.startswith("FORGELINE_")]:
            env.delenv(name)
        env.chdir(folder)
        settings = get_settings(
            database_url=databases.create(),
            data_dir=folder / "data",
            storage_url=(folder / "artifacts").as_uri(),
            admin_key=ADMIN_KEY,
            secret_key=SECRET_KEY,
            rate_limit_per_key="100000/minute",
            rate_limit_per_ip="100000/minute",
            max_active_jobs_per_key=100000,
        )
    with ThreadedServer(settings) as running:
        SEEDED["job_id"] = _finished_job(running.url)
        yield running
        SEEDED.clear()


def _finished_job(url: str) -> str:
    """A job that has reached its end (cancelled while queued; no worker runs here)."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=REQUEST_TIMEOUT_S) as client:
        submitted = client.post(JOBS, json={"pipeline": "echo", "input": {"text": "hello"}})
        job_id: str = submitted.raise_for_status().json()["id"]
        cancelled = client.post(f"{JOBS}/{job_id}/cancel").raise_for_status().json()
    assert cancelled["status"] == "cancelled"
    return job_id


def _document() -> dict[str, Any]:
    """The API's OpenAPI document, built without serving (it does not depend on settings)."""
    return create_app(Settings.model_construct()).openapi()


# Schemathesis makes one test per operation when pytest collects, so it needs
# the document then; the test below proves the server serves the same one.
schema = schemathesis.openapi.from_dict(_document(), config=CONFIG)


def test_the_server_serves_the_document_under_test(server: ThreadedServer) -> None:
    """``/openapi.json`` of the live server is the document Schemathesis works from."""
    served = httpx.get(f"{server.url}/openapi.json", timeout=REQUEST_TIMEOUT_S)

    assert served.status_code == 200
    assert served.json() == _document()


@schema.hook
def flatmap_case(context: schemathesis.HookContext, case: schemathesis.Case) -> Any:
    """Half of the valid requests naming a job name the seeded one instead."""
    mode = case.meta.generation.mode if case.meta is not None else None
    if mode is not GenerationMode.POSITIVE or "job_id" not in (case.path_parameters or {}):
        return st.just(case)

    def seeded(use_seeded: bool) -> schemathesis.Case:
        if use_seeded:
            case.path_parameters = {**case.path_parameters, "job_id": SEEDED["job_id"]}
        return case

    return st.booleans().map(seeded)


@schema.parametrize()
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case, server: ThreadedServer
) -> None:
    """Every generated request gets an answer the document allows, and no 5xx."""
    response = case.call_and_validate(base_url=server.url)
    # Schemathesis stops reading a stream at its time limit without failing;
    # here the only job with a stream is finished, so its stream must end.
    assert not response.stream_cut_short, f"{case.formatted_path}: the stream did not end"
