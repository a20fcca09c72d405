"""The ``forgeline`` command line."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
import uvicorn
from rich.console import Console
from rich.table import Table

from forgeline import __version__, telemetry
from forgeline.errors import ConfigurationError, DatabaseUnavailableError, ForgelineError
from forgeline.logs import configure_logging
from forgeline.settings import Settings, get_settings
from forgeline.training.command import train as train_command

app = typer.Typer(
    name="forgeline",
    help="Durable, streaming AI generation jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# soft_wrap: a long message stays one line when output goes to a log collector.
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

#: On shutdown, how long in-flight HTTP requests may take to finish.
HTTP_DRAIN_S = 5

T = TypeVar("T")

HostOption = Annotated[str | None, typer.Option(help="Interface to listen on.")]
PortOption = Annotated[int | None, typer.Option(help="Port to listen on.")]


def _settings(**overrides: Any) -> Settings:
    """Load settings or exit 2 with one line per problem."""
    try:
        settings = get_settings(**{k: v for k, v in overrides.items() if v is not None})
    except ConfigurationError as exc:
        for line in exc.message.splitlines():
            err.print(f"[red]error:[/red] {line}", highlight=False)
        raise typer.Exit(2) from None
    configure_logging(settings)
    try:
        telemetry.setup(settings)
    except ConfigurationError as exc:
        raise _fail(exc.message, 2) from None
    return settings


def _fail(message: str, code: int = 1) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(code)


def _exit_status(exc: ForgelineError) -> int:
    """2 for settings to fix, 1 for everything else (an unreachable database)."""
    return 2 if isinstance(exc, ConfigurationError) else 1


def _run_server(main: Coroutine[Any, Any, T]) -> T:
    """Run a long-lived process's ``main`` on uvloop where it is installed.

    uvloop spends about half the CPU of asyncio's own loop on the socket
    work that streaming is made of; without it (Windows), asyncio's loop.
    """
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def _serve(settings: Settings, *, with_worker: bool) -> None:
    try:
        started = _run_server(_serve_async(settings, with_worker=with_worker))
    except ForgelineError as exc:
        raise _fail(exc.message, _exit_status(exc)) from None
    if not started:
        raise typer.Exit(1)


async def _serve_async(settings: Settings, *, with_worker: bool) -> bool:
    from forgeline.api.app import create_app
    from forgeline.runtime import Runtime

    # Started before listening, so a bad setting is one line and exit 2.
    runtime = await Runtime.start(settings)
    if runtime.new_admin_key is not None:
        _show_new_admin_key(settings, runtime.new_admin_key)
    app = create_app(settings, with_worker=with_worker, runtime=runtime)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        lifespan="on",
        # Streams end at once with "reconnect"; this bounds other requests.
        timeout_graceful_shutdown=HTTP_DRAIN_S,
    )
    server = _Server(config, app.state.stopping)
    await server.serve()
    return server.started


class _Server(uvicorn.Server):
    """uvicorn, telling the app the moment shutdown begins.

    Readiness fails at once and open streams end with a "reconnect" event,
    instead of holding the shutdown until they time out.
    """

    def __init__(self, config: uvicorn.Config, stopping: asyncio.Event) -> None:
        super().__init__(config)
        self._stopping = stopping

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # Our own handlers: uvicorn's re-raise the signal after a graceful
        # shutdown, which would end a clean drain with status -15.
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._begin_shutdown, signum)
        try:
            yield
        finally:
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(signum)

    def _begin_shutdown(self, signum: int) -> None:
        self._stopping.set()
        if self.should_exit and signum == signal.SIGINT:
            self.force_exit = True  # a second Ctrl-C: stop waiting
        self.should_exit = True


@app.command()
def serve(host: HostOption = None, port: PortOption = None) -> None:
    """Run the API and a worker in one process (the embedded default)."""
    settings = _settings(host=host, port=port)
    if settings.embedded_database:
        err.print(f"forgeline {__version__}: embedded database in {settings.data_dir}")
    err.print(f"forgeline listening on http://{settings.host}:{settings.port}")
    _serve(settings, with_worker=True)


@app.command()
def api(host: HostOption = None, port: PortOption = None) -> None:
    """Run the API only (scale it with replicas)."""
    _serve(_settings(host=host, port=port), with_worker=False)


@app.command()
def worker(
    concurrency: Annotated[
        int | None, typer.Option(min=1, help="Jobs run at once by this process.")
    ] = None,
) -> None:
    """Run a worker only (scale it on queue depth)."""
    settings = _settings(worker_concurrency=concurrency)
    try:
        _run_server(_run_worker(settings))
    except ForgelineError as exc:
        raise _fail(exc.message, _exit_status(exc)) from None


async def _run_worker(settings: Settings) -> None:
    from forgeline.runtime import Runtime

    runtime = await Runtime.start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    err.print(f"forgeline worker running {settings.worker_concurrency} jobs at a time")
    probes = None
    if settings.metrics_port is not None:
        from forgeline.api.app import create_probe_app

        config = uvicorn.Config(
            create_probe_app(settings, runtime, stop),
            host=settings.host,
            port=settings.metrics_port,
            log_config=None,
            access_log=False,
            lifespan="off",
        )
        probes = _ProbeServer(config)
        serving = asyncio.create_task(probes.serve())
    try:
        await runtime.run_worker(stop)
    finally:
        if probes is not None:
            probes.should_exit = True
            await serving
        await runtime.close()
        telemetry.shutdown()


class _ProbeServer(uvicorn.Server):
    """uvicorn for a worker's probes and metrics; the worker owns the signals."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@app.command()
def migrate() -> None:
    """Apply database migrations, then exit."""
    settings = _settings()

    async def run() -> None:
        from forgeline.db import migrate as migrations
        from forgeline.db.engine import check_reachable, create_engine
        from forgeline.runtime import resolve_database

        engine = create_engine(await resolve_database(settings), pool_size=1)
        try:
            await check_reachable(engine)
            pending = await migrations.pending_revisions(engine)
            await migrations.upgrade(engine)
        finally:
            await engine.dispose()
        out.print(f"database schema is current ({len(pending)} migration(s) applied)")

    try:
        asyncio.run(run())
    except ForgelineError as exc:
        raise _fail(exc.message, _exit_status(exc)) from None


def _show_new_admin_key(settings: Settings, token: str) -> None:
    from forgeline.auth import ADMIN_KEY_FILE

    # Straight to the terminal, never through the logs.
    err.print(
        "\n[bold]Your admin API key[/bold] (shown once; also kept in "
        f"{settings.data_dir / ADMIN_KEY_FILE}, readable by you only):\n\n    {token}\n\n"
        "Send it as 'Authorization: Bearer <key>'. Make more with `forgeline keys create`.\n",
        highlight=False,
    )


keys_app = typer.Typer(
    help="API keys: create, list, revoke. Works on the database directly; no server needed.",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


def _with_keys(work: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``work(key_service)`` on the configured (or embedded) database."""
    settings = _settings()

    async def run() -> Any:
        from forgeline.auth import KeyService, resolve_secret_key
        from forgeline.db import migrate as migrations
        from forgeline.db.engine import check_reachable, create_engine, create_session_factory
        from forgeline.runtime import resolve_database

        engine = create_engine(await resolve_database(settings), pool_size=1)
        try:
            await check_reachable(engine)
            if settings.should_auto_migrate:
                await migrations.upgrade(engine)
            elif await migrations.pending_revisions(engine):
                raise ConfigurationError(
                    "the database schema is not current: run `forgeline migrate` first"
                )
            keys = KeyService(
                create_session_factory(engine), resolve_secret_key(settings), cache_s=0
            )
            return await work(keys)
        finally:
            await engine.dispose()

    try:
        return asyncio.run(run())
    except ForgelineError as exc:
        raise _fail(exc.message, _exit_status(exc)) from None


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(help="What the key is for, e.g. blog-writer.")],
    admin: Annotated[bool, typer.Option(help="May manage keys through the admin routes.")] = False,
    quiet: Annotated[bool, typer.Option(help="Print only the key (for scripts).")] = False,
) -> None:
    """Make a key. It is printed once; only its hash is stored."""
    new = _with_keys(lambda keys: keys.create(name, admin=admin))
    if quiet:
        print(new.token)
        return
    kind = "admin key" if admin else "key"
    out.print(f"created {kind} {new.key.name!r} ({new.key.prefix}, id {new.key.id})")
    out.print("it is shown this once; store it now:\n")
    print(new.token)


@keys_app.command("list")
def keys_list() -> None:
    """Every key: prefix, name, role, created, revoked."""
    keys = _with_keys(lambda keys: keys.list())
    table = Table("prefix", "name", "role", "created", "revoked", "id", title="API keys")
    for key in keys:
        table.add_row(
            key.prefix,
            key.name,
            "admin" if key.admin else "user",
            f"{key.created_at:%Y-%m-%d %H:%M}",
            f"{key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "",
            str(key.id),
        )
    out.print(table)


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[str, typer.Argument(help="The key's prefix (fl_xxxxxxxx) or id.")],
) -> None:
    """Revoke a key; running servers refuse it from now on."""
    revoked = _with_keys(lambda keys: keys.revoke(key))
    out.print(f"revoked {revoked.prefix} ({revoked.name})")


@app.command()
def doctor() -> None:
    """Show the effective settings (secrets hidden) and check every dependency."""
    settings = _settings()
    table = Table("setting", "value", title="effective settings")
    for name, value in settings.redacted().items():
        table.add_row(name, value)
    out.print(table)
    try:
        results = asyncio.run(_doctor_checks(settings))
    except ForgelineError as exc:
        raise _fail(exc.message) from None
    checks = Table("check", "result", "detail", "ms", title="dependencies")
    for name, ok, critical, detail, ms in results:
        verdict = (
            "[green]ok[/green]"
            if ok
            else ("[red]FAIL[/red]" if critical else "[yellow]warn[/yellow]")
        )
        checks.add_row(name, verdict, detail, f"{ms:.0f}")
    out.print(checks)
    failed = [name for name, ok, critical, *_ in results if critical and not ok]
    warned = [name for name, ok, critical, *_ in results if not critical and not ok]
    if failed:
        out.print(f"[red]verdict: not ready[/red] ({', '.join(failed)} failing)")
        raise typer.Exit(1)
    if warned:
        out.print(f"[yellow]verdict: ready, with warnings[/yellow] ({', '.join(warned)})")
    else:
        out.print("[green]verdict: ready[/green]")


async def _doctor_checks(settings: Settings) -> list[tuple[str, bool, bool, str, float]]:
    from forgeline.db.migrate import pending_revisions
    from forgeline.health import run_checks
    from forgeline.runtime import Runtime

    try:
        runtime = await Runtime.start(settings)
    except DatabaseUnavailableError as exc:
        return [("database", False, True, exc.message, 0.0)]
    try:
        results = [
            (r.name, r.ok, r.critical, r.detail, r.duration_ms) for r in await run_checks(runtime)
        ]
        pending = await pending_revisions(runtime.engine)
        detail = (
            "current"
            if not pending
            else f"{len(pending)} migration(s) pending: run `forgeline migrate`"
        )
        results.insert(1, ("schema", not pending, True, detail, 0.0))
        return results
    finally:
        await runtime.close()


@app.command()
def generate(
    prompt: Annotated[str, typer.Argument(help="The idea for the story.")],
    url: Annotated[
        str | None,
        typer.Option(help="A running forgeline (http://host:port); default: in-process."),
    ] = None,
    genre: Annotated[str | None, typer.Option(help="e.g. fantasy, mystery.")] = None,
    max_tokens: Annotated[int, typer.Option(min=1, max=4096)] = 512,
    temperature: Annotated[float, typer.Option(min=0.0, max=2.0)] = 0.8,
    seed: Annotated[int | None, typer.Option(min=0)] = None,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="FORGELINE_API_KEY",
            help="API key for --url; default: the local admin key in the data directory.",
        ),
    ] = None,
) -> None:
    """Write a story with the story pipeline, printing it as it is generated."""
    story_input: dict[str, Any] = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
    }
    if genre is not None:
        story_input["genre"] = genre
    if seed is not None:
        story_input["seed"] = seed
    settings = _settings()
    printer = _StoryPrinter()
    try:
        if url is None:
            asyncio.run(_generate_in_process(settings, story_input, printer))
        else:
            _generate_remote(url, key or _local_admin_key(settings), story_input, printer)
    except ForgelineError as exc:
        raise _fail(exc.message) from None
    printer.finish()


class _StoryPrinter:
    """Prints a job's stream: text as it comes, a note when an attempt restarts."""

    def __init__(self) -> None:
        self.final: dict[str, Any] | None = None
        self._printed = False

    def handle(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "token":
            sys.stdout.write(data["text"])
            sys.stdout.flush()
            self._printed = True
        elif kind == "attempt" and data.get("attempt", 1) > 1:
            if self._printed:
                sys.stdout.write("\n")
            err.print(f"[yellow](attempt {data['attempt']}: starting over)[/yellow]")
            self._printed = False
        elif kind == "final":
            self.final = data

    def finish(self) -> None:
        if self._printed:
            sys.stdout.write("\n")
            sys.stdout.flush()
        if self.final is None:
            raise _fail("the stream ended before the job finished")
        if self.final["status"] != "succeeded":
            reason = (self.final.get("error") or {}).get("message", "no reason given")
            raise _fail(f"job {self.final['status']}: {reason}")


async def _generate_in_process(
    settings: Settings, story_input: dict[str, Any], printer: _StoryPrinter
) -> None:
    from forgeline.events.stream import follow
    from forgeline.runtime import Runtime

    runtime = await Runtime.start(settings.model_copy(update={"worker_concurrency": 1}))
    runtime.hub.start()
    stop = asyncio.Event()
    worker = asyncio.create_task(runtime.run_worker(stop))
    try:
        submission = await runtime.jobs.submit(owner=None, pipeline="story", job_input=story_input)
        async for event in follow(runtime.hub, runtime.sessions, submission.job.id):
            printer.handle(event.type.value, event.data)
    finally:
        stop.set()
        await worker
        await runtime.close()


def _local_admin_key(settings: Settings) -> str | None:
    from forgeline.auth import ADMIN_KEY_FILE

    path = settings.data_dir / ADMIN_KEY_FILE
    return path.read_text().strip() if path.is_file() else None


def _generate_remote(
    url: str, key: str | None, story_input: dict[str, Any], printer: _StoryPrinter
) -> None:
    from forgeline.client import ForgelineClient

    client = ForgelineClient(url, api_key=key)
    try:
        job = client.submit("story", story_input)
        for event in client.events(job["id"]):
            printer.handle(event.type, event.data)
    finally:
        client.close()


@app.command()
def bench(
    url: Annotated[
        str | None,
        typer.Option(help="A running forgeline (http://host:port); default: in-process."),
    ] = None,
    key: Annotated[
        str | None,
        typer.Option(
            envvar="FORGELINE_API_KEY",
            help="API key for --url; default: the local admin key in the data directory. "
            "In-process runs make their own.",
        ),
    ] = None,
    pipeline: Annotated[str, typer.Option(help="The pipeline every job runs.")] = "story",
    jobs: Annotated[int, typer.Option(min=1, help="How many jobs to run.")] = 10,
    concurrency: Annotated[int, typer.Option(min=1, help="Jobs in flight at once.")] = 3,
    ramp_s: Annotated[
        float, typer.Option(min=0, help="Grow from 1 to --concurrency over this many seconds.")
    ] = 0.0,
    job_input: Annotated[
        str | None,
        typer.Option("--input", help="Each job's input, a JSON object (story: a fixed prompt)."),
    ] = None,
    timeout_s: Annotated[
        float, typer.Option(min=1, help="A job with no final event by then counts as timed out.")
    ] = 120.0,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write the report as JSON to this file.")
    ] = None,
    thresholds: Annotated[
        Path | None, typer.Option(help="TOML file overriding the default thresholds.")
    ] = None,
    compare: Annotated[
        Path | None, typer.Option(help="A report saved with --json to compare against.")
    ] = None,
    fail_on_regression: Annotated[
        bool, typer.Option(help="Exit 1 when a figure regressed against --compare.")
    ] = False,
) -> None:
    """Benchmark generation jobs: timings, a stress figure and a pass/fail verdict.

    Exit status 0 when every threshold passes, 1 when one fails, 2 when the
    benchmark cannot run (wrong URL, refused key, unknown pipeline).
    """
    from forgeline.benchmark.command import BenchOptions, run_bench

    if url is not None and key is None:
        key = _local_admin_key(_settings())
    options = BenchOptions(
        url=url,
        api_key=key,
        pipeline=pipeline,
        jobs=jobs,
        concurrency=concurrency,
        ramp_s=ramp_s,
        input_json=job_input,
        job_timeout_s=timeout_s,
        json_path=json_path,
        thresholds_path=thresholds,
        compare_path=compare,
        fail_on_regression=fail_on_regression,
    )
    # In-process only: a remote run needs no settings. Warnings only, so
    # the server's logs do not bury the progress bar.
    settings = _settings(log_level="warning") if url is None else None
    try:
        status = run_bench(options, settings=settings, out=out, err=err)
    except ForgelineError as exc:
        raise _fail(exc.message, 2) from None
    raise typer.Exit(status)


# Lives beside the training code, which imports torch only when it runs.
app.command(name="train")(train_command)


def main() -> None:
    """Entry point of the ``forgeline`` script."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
