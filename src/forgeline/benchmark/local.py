"""forgeline served in-process for a benchmark run, on a free local port.

``forgeline bench`` without ``--url`` measures the embedded defaults: the
same API and worker ``forgeline serve`` runs, in this process, reached over
real HTTP by the same client code as a remote run, so the figures include
the HTTP and streaming path.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn

from forgeline.benchmark import BenchmarkError
from forgeline.errors import ForgelineError
from forgeline.settings import Settings

#: How long the in-process server may take to accept connections once its runtime is up.
START_TIMEOUT_S = 30.0
START_POLL_S = 0.05
#: Name of the API key each in-process run makes for itself (and revokes).
BENCH_KEY_NAME = "forgeline bench (in-process)"


class _Server(uvicorn.Server):
    """uvicorn without signal handling: Ctrl-C stops the benchmark, not just the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass(frozen=True)
class LocalServer:
    """Where the in-process forgeline listens, and the API key made for this run."""

    url: str
    api_key: str


@contextlib.asynccontextmanager
async def serve_in_process(settings: Settings) -> AsyncIterator[LocalServer]:
    """Run the API and a worker on ``127.0.0.1`` at a free port, with a key for this run.

    Start-up errors (a bad setting, an unreachable database) are raised as
    forgeline errors before anything listens. The key is an ordinary
    (non-admin) key, revoked when the run ends. On exit the server stops the
    way ``forgeline serve`` does: streams end, the worker drains.
    """
    from forgeline.api.app import create_app
    from forgeline.runtime import Runtime

    runtime = await Runtime.start(settings)
    try:
        bench_key = await runtime.keys.create(BENCH_KEY_NAME)
    except BaseException:
        await runtime.close()
        raise
    app = create_app(settings, with_worker=True, runtime=runtime)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = _Server(
        uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none")
    )
    serving = asyncio.create_task(server.serve(sockets=[listener]), name="bench-server")
    try:
        await _wait_started(server, serving)
        yield LocalServer(f"http://127.0.0.1:{port}", bench_key.token)
    finally:
        with contextlib.suppress(ForgelineError):
            await runtime.keys.revoke(str(bench_key.key.id))
        server.should_exit = True
        with contextlib.suppress(SystemExit):
            await serving
        listener.close()


async def _wait_started(server: uvicorn.Server, serving: asyncio.Task[None]) -> None:
    try:
        async with asyncio.timeout(START_TIMEOUT_S):
            while not server.started:
                if serving.done():
                    # uvicorn exits (SystemExit) when the app's start-up fails.
                    raise BenchmarkError("the in-process forgeline did not start")
                await asyncio.sleep(START_POLL_S)
    except TimeoutError:
        raise BenchmarkError(
            f"the in-process forgeline did not start within {START_TIMEOUT_S:g} s"
        ) from None
