"""The ``forgeline`` command line, run as a subprocess the way an operator types it."""

from __future__ import annotations

import re
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg import sql

from tests.acceptance.conftest import EnvFactory, ProcessFactory
from tests.support.auth import ADMIN_KEY
from tests.support.openai_server import OpenAIServer
from tests.support.postgres import DatabaseFactory
from tests.support.processes import free_port, run_cli

COMMANDS = ["serve", "api", "worker", "migrate", "doctor", "generate"]
PROMPT = "a clockmaker who repairs time itself"
CANARY_KEY = "sk-canary-123"
#: How long a command that cannot reach the database may take to say so.
GIVE_UP_BOUND_S = 6.0


@pytest.fixture
def empty_database(databases: DatabaseFactory) -> Iterator[str]:
    """A new database with no schema at all; dropped at teardown."""
    name = f"fl_empty_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(databases.admin_url, autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    yield databases.url_of(name)
    with psycopg.connect(databases.admin_url, autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )


def assert_no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    """Fail if a Python traceback reached the user."""
    assert "Traceback" not in result.stdout + result.stderr, result.stdout + result.stderr


def test_help_lists_every_command(forgeline_environ: EnvFactory) -> None:
    """`forgeline --help` exits 0 and names every command."""
    result = run_cli(["--help"], forgeline_environ())

    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_each_command_has_help(forgeline_environ: EnvFactory, command: str) -> None:
    """`forgeline COMMAND --help` exits 0 with a usage line, touching nothing."""
    result = run_cli([command, "--help"], forgeline_environ(database_url=None))

    assert result.returncode == 0, result.stderr
    assert f"forgeline {command}" in result.stdout


@pytest.mark.parametrize(
    ("variables", "named"),
    [
        pytest.param({"port": "notaport"}, ["FORGELINE_PORT"], id="port"),
        pytest.param(
            {"environment": "prod", "database_url": None}, ["FORGELINE_DATABASE_URL"], id="prod"
        ),
        pytest.param({"stall_threshold_s": "1"}, ["FORGELINE_STALL_THRESHOLD_S"], id="stall"),
        pytest.param(
            {"environment": "prod", "database_url": None, "stall_threshold_s": "1"},
            ["FORGELINE_STALL_THRESHOLD_S", "FORGELINE_DATABASE_URL"],
            id="two-problems",
        ),
    ],
)
def test_invalid_settings_exit_2_naming_each_variable(
    forgeline_environ: EnvFactory, variables: dict[str, str | None], named: list[str]
) -> None:
    """Invalid settings exit 2 with one `error:` line per problem, naming its variable."""
    result = run_cli(["doctor"], forgeline_environ(**variables))

    assert result.returncode == 2, result.stdout + result.stderr
    assert_no_traceback(result)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == len(named), result.stderr
    for line, variable in zip(errors, named, strict=True):
        assert line.startswith(f"error: {variable}: "), result.stderr


def test_settings_errors_are_not_wrapped(forgeline_environ: EnvFactory) -> None:
    """A long settings error stays on one line when stderr is a pipe (as in a log collector)."""
    env = forgeline_environ(stall_threshold_s="1")
    env["COLUMNS"] = "80"  # what a console library assumes for a pipe

    result = run_cli(["doctor"], env)

    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr


def test_migrate_applies_then_finds_nothing_pending(
    forgeline_environ: EnvFactory, empty_database: str
) -> None:
    """`forgeline migrate` creates the schema in an empty database; a second run applies none."""
    env = forgeline_environ(database_url=empty_database)

    first = run_cli(["migrate"], env)
    second = run_cli(["migrate"], env)

    assert first.returncode == 0, first.stdout + first.stderr
    applied = re.search(r"\((\d+) migration\(s\) applied\)", first.stdout)
    assert applied is not None, first.stdout
    assert int(applied.group(1)) >= 1
    with psycopg.connect(empty_database) as connection:
        tables = {row[0] for row in connection.execute("SELECT tablename FROM pg_tables")}
    assert {"jobs", "artifacts", "procrastinate_jobs"} <= tables
    assert second.returncode == 0, second.stdout + second.stderr
    assert "(0 migration(s) applied)" in second.stdout


def test_migrate_against_an_unreachable_database_fails_clearly(
    forgeline_environ: EnvFactory,
) -> None:
    """`forgeline migrate` with nothing at the database URL exits non-zero, without a traceback."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/forgeline"

    result = run_cli(["migrate"], forgeline_environ(database_url=unreachable))

    assert result.returncode != 0
    assert_no_traceback(result)
    assert result.stderr.startswith("error: "), result.stderr


def test_doctor_reports_ready_without_showing_secrets(forgeline_environ: EnvFactory) -> None:
    """`forgeline doctor` hides the API key, reports every check and exits 0 with `ready`."""
    result = run_cli(["doctor"], forgeline_environ(openai_api_key=CANARY_KEY))

    assert result.returncode == 0, result.stdout + result.stderr
    assert CANARY_KEY not in result.stdout + result.stderr
    for check in ["database", "schema", "queue", "storage", "backend:openai"]:
        assert re.search(rf"{re.escape(check)}\s.*\sok\s", result.stdout), result.stdout
    assert "verdict: ready" in result.stdout


def test_doctor_fails_promptly_when_the_database_is_unreachable(
    forgeline_environ: EnvFactory,
) -> None:
    """With the database unreachable, doctor says `not ready` and exits non-zero, promptly."""
    unreachable = f"postgresql://postgres@127.0.0.1:{free_port()}/forgeline"
    env = forgeline_environ(database_url=unreachable, openai_api_key=CANARY_KEY)

    result = run_cli(["doctor"], env, timeout_s=GIVE_UP_BOUND_S)

    assert result.returncode != 0
    assert_no_traceback(result)
    assert CANARY_KEY not in result.stdout + result.stderr
    assert "verdict: not ready" in result.stdout


def test_generate_against_a_running_server_prints_the_story(
    start_forgeline: ProcessFactory, forgeline_environ: EnvFactory, openai_server: OpenAIServer
) -> None:
    """`forgeline generate PROMPT --url URL` prints the story the model wrote, verbatim."""
    serve = start_forgeline("serve")

    result = run_cli(
        ["generate", PROMPT, "--url", serve.url, "--key", ADMIN_KEY], forgeline_environ()
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert PROMPT in openai_server.replies[-1]
    assert result.stdout == openai_server.replies[-1].strip() + "\n"


def test_generate_in_process_prints_the_story(
    forgeline_environ: EnvFactory, openai_server: OpenAIServer
) -> None:
    """`forgeline generate PROMPT` runs the job in-process on the configured database."""
    result = run_cli(["generate", PROMPT], forgeline_environ())

    assert result.returncode == 0, result.stdout + result.stderr
    assert PROMPT in openai_server.replies[-1]
    assert result.stdout == openai_server.replies[-1].strip() + "\n"


def test_generate_with_a_wrong_url_fails_clearly(forgeline_environ: EnvFactory) -> None:
    """`generate --url` at nothing exits 1 naming the URL, without a traceback."""
    url = f"http://127.0.0.1:{free_port()}"

    result = run_cli(["generate", PROMPT, "--url", url], forgeline_environ(), timeout_s=30)

    assert result.returncode == 1
    assert_no_traceback(result)
    assert f"cannot reach forgeline at {url}" in result.stderr


@pytest.mark.slow
def test_embedded_defaults_make_a_local_admin_key_shown_once(
    start_forgeline: ProcessFactory, forgeline_environ: EnvFactory, tmp_path: Path
) -> None:
    """First start on the embedded database: an admin key, printed once, kept 0600; the
    keys command then works on that data directory with no server running."""
    embedded = {"database_url": None, "admin_key": None, "secret_key": None}
    first = start_forgeline("serve", **embedded)
    key_file = tmp_path / "data" / "admin_key"
    key = key_file.read_text().strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key in first.output()
    headers = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{first.url}/api/v1/jobs", headers=headers, timeout=5).status_code == 200
    assert httpx.get(f"{first.url}/api/v1/jobs", timeout=5).status_code == 401
    assert first.stop() == 0

    second = start_forgeline("serve", **embedded)
    assert second.stop() == 0
    assert key not in second.output()
    assert "admin API key" not in second.output()

    env = forgeline_environ(**embedded)
    made = run_cli(["keys", "create", "writer", "--quiet"], env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip()
    assert re.fullmatch(r"fl_[0-9a-f]{8}_[A-Za-z0-9_-]{43}", token)
    listed = run_cli(["keys", "list"], env)
    assert "writer" in listed.stdout
    assert "local-admin" in listed.stdout
    assert token not in listed.stdout
    revoked = run_cli(["keys", "revoke", token[:11]], env)
    assert revoked.returncode == 0, revoked.stderr
    unknown = run_cli(["keys", "revoke", "fl_00000000"], env)
    assert unknown.returncode == 1
    assert "no key" in unknown.stderr
