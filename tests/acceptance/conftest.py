"""Fixtures of the acceptance tier: forgeline's commands as subprocesses, a real model server.

Every process gets its settings the way an operator gives them, as
``FORGELINE_*`` variables: this test's database, data directory and storage
folder, the test model server, and timings shrunk so recovery paths run in
seconds.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import FAST_TIMINGS
from tests.support.auth import ADMIN_KEY, SECRET_KEY
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ForgelineProcess, forgeline_env, free_port, settings_env

#: Settings for a subprocess: a value of ``None`` leaves that variable unset.
EnvFactory = Callable[..., dict[str, str]]
ProcessFactory = Callable[..., ForgelineProcess]


@pytest.fixture
def openai_server() -> Iterator[OpenAIServer]:
    """A running OpenAI-compatible model server that tells deterministic stories."""
    with OpenAIServer() as server:
        yield server


@pytest.fixture
def forgeline_environ(database_url: str, tmp_path: Path, openai_server: OpenAIServer) -> EnvFactory:
    """Builds a subprocess environment for this test; keyword arguments override settings.

    ``forgeline_environ(port=8001, database_url=None)`` sets ``FORGELINE_PORT``
    and leaves ``FORGELINE_DATABASE_URL`` out.
    """

    def make(**overrides: object) -> dict[str, str]:
        values: dict[str, object] = {
            "database_url": database_url,
            "data_dir": tmp_path / "data",
            "storage_url": (tmp_path / "artifacts").as_uri(),
            # Deterministic stories from the test server, not the built-in model.
            "backend": "openai",
            "openai_base_url": openai_server.base_url,
            "openai_model": openai_server.model,
            "backend_connect_timeout_s": 1.0,
            "admin_key": ADMIN_KEY,
            "secret_key": SECRET_KEY,
            **FAST_TIMINGS,
        }
        values.update(overrides)
        return forgeline_env(settings_env(**{k: v for k, v in values.items() if v is not None}))

    return make


@pytest.fixture
def start_forgeline(forgeline_environ: EnvFactory, tmp_path: Path) -> Iterator[ProcessFactory]:
    """Starts ``forgeline serve|api|worker`` subprocesses; all are stopped at teardown.

    So is the embedded PostgreSQL, should one be left running in the data
    directory once they have exited.

    ``start_forgeline("serve", backend_max_retries=0)`` returns once the
    process answers ``/readyz`` (pass ``wait=False`` not to wait, as for a
    worker, which serves no HTTP).
    """
    started: list[ForgelineProcess] = []

    def start(
        command: str = "serve", *, wait: bool = True, **overrides: object
    ) -> ForgelineProcess:
        port = free_port() if command in {"serve", "api"} else None
        env = forgeline_environ(**({"port": port} if port else {}), **overrides)
        log_path = tmp_path / f"{command}-{len(started)}.log"
        process = ForgelineProcess([command], env, log_path, port=port).start()
        started.append(process)
        if wait and port is not None:
            process.wait_ready()
        return process

    yield start
    for process in started:
        process.stop()
    stop_embedded_postgres(tmp_path / "data" / "postgres")


def stop_embedded_postgres(pgdata: Path, timeout_s: float = 10.0) -> None:
    """Stop a PostgreSQL that serve started in ``pgdata`` and left running, if any."""
    pid_file = pgdata / "postmaster.pid"
    if not pid_file.exists():
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid_file.read_text().split()[0]), signal.SIGINT)  # fast shutdown
    deadline = time.monotonic() + timeout_s
    while pid_file.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
