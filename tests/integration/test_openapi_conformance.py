"""Schemathesis against the OpenAPI document of a real server: every default check passes.

Schemathesis reads ``/openapi.json`` and sends each operation generated
requests, valid and invalid, with the admin key. Its checks then hold the
answers to the document: no 5xx, only documented status codes, headers and
content types, bodies that match their schemas, invalid input refused and
valid input accepted.

The server is uvicorn on a real socket (the event stream needs one), run in
a thread with its own event loop, since schemathesis calls it synchronously.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Iterator

import pytest
import schemathesis
import uvicorn

from forgeline.api.app import create_app
from forgeline.runtime import Runtime
from forgeline.settings import Settings, get_settings
from tests.support.auth import ADMIN_KEY, AUTH, SECRET_KEY
from tests.support.postgres import DatabaseFactory
from tests.support.processes import free_port

#: Generated cases per operation and phase: enough to reach odd input, bounded in time.
MAX_EXAMPLES = 30
#: Longest the server may take to start or stop.
SERVER_DEADLINE_S = 30.0

CONFIG = schemathesis.Config.from_dict(
    {
        "seed": 20261123,
        "headers": AUTH,
        "generation": {"max-examples": MAX_EXAMPLES, "deterministic": True},
    }
)


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
        yield running


# The document does not depend on settings: build it from the defaults.
schema = schemathesis.openapi.from_dict(
    create_app(Settings.model_construct()).openapi(), config=CONFIG
)


@schema.parametrize()
def test_api_conforms_to_its_openapi_document(
    case: schemathesis.Case, server: ThreadedServer
) -> None:
    """Every generated request gets an answer the document allows, and no 5xx."""
    case.call_and_validate(base_url=server.url)
