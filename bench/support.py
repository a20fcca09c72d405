"""What every benchmark shares: machine facts, a scratch database, subprocesses, output.

The benchmarks run forgeline the way it is deployed, as ``python -m forgeline``
subprocesses, each in an empty working directory with only the ``FORGELINE_*``
variables the benchmark sets (a developer's ``.env`` is never read).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import httpx
import psycopg
from psycopg import sql

from forgeline.auth import new_token

#: Where the benchmarks find a PostgreSQL server they may create databases on.
ADMIN_URL_ENV = "FORGELINE_BENCH_ADMIN_URL"
DEFAULT_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
#: Versions worth knowing when comparing two runs.
PACKAGES = ("forgeline", "procrastinate", "psycopg", "sqlalchemy", "fastapi", "uvicorn")


# -- command line -------------------------------------------------------------
def base_parser(description: str) -> argparse.ArgumentParser:
    """A parser with the options every benchmark takes (``--json``)."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--json", metavar="PATH", type=Path, help="also write the figures as JSON to PATH"
    )
    return parser


def add_admin_url(parser: argparse.ArgumentParser) -> None:
    """The ``--admin-url`` option of benchmarks that need a PostgreSQL server."""
    parser.add_argument(
        "--admin-url",
        default=os.environ.get(ADMIN_URL_ENV, DEFAULT_ADMIN_URL),
        help=f"PostgreSQL URL allowed to create and drop databases (env {ADMIN_URL_ENV})",
    )


def write_json(path: Path | None, figures: Mapping[str, Any]) -> None:
    """Write ``figures`` to ``path`` when one was given."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    print(f"\nfigures written to {path}")


# -- machine ------------------------------------------------------------------
def cpu_model() -> str:
    """The CPU's marketing name, from /proc/cpuinfo where there is one."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def usable_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def postgres_version(url: str) -> str:
    """``server_version`` of the server at ``url``, or why it could not be read."""
    try:
        with psycopg.connect(url, connect_timeout=5) as connection:
            row = connection.execute("SHOW server_version").fetchone()
    except psycopg.Error as exc:
        return f"unreachable ({exc})"
    return str(row[0]) if row else "unknown"


def machine_info(postgres_url: str | None = None) -> dict[str, Any]:
    """Facts about the machine that decide what the figures mean."""
    packages: dict[str, str] = {}
    for name in PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = "not installed"
    info: dict[str, Any] = {
        "cores": usable_cores(),
        "cpu_model": cpu_model(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": packages,
    }
    if postgres_url is not None:
        info["postgresql"] = postgres_version(postgres_url)
    info["source"] = source_revision()
    info["load_average_1m"] = load_average()
    return info


def load_average() -> float | None:
    """The one-minute load average: how much else wants the cores right now."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def source_revision() -> str:
    """The checkout's commit, with ``+changes`` when the tree has uncommitted edits."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "src"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("+changes" if dirty else "")


def print_machine(info: Mapping[str, Any]) -> None:
    """The machine facts as a few lines."""
    print(f"machine     {info['cores']} cores, {info['cpu_model']}")
    print(f"python      {info['python']} on {info['platform']}")
    if "postgresql" in info:
        print(f"postgresql  {info['postgresql']}")
    print(f"source      {info.get('source', 'unknown')}")
    print("packages    " + ", ".join(f"{k} {v}" for k, v in info["packages"].items()))


# -- figures ------------------------------------------------------------------
def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile of ``values`` (nearest rank; 0.5 is the median)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, round(fraction * len(ordered) + 0.5 - 1e-9))
    return ordered[min(rank, len(ordered)) - 1]


def summary_ms(seconds: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99, mean, min and max of durations, in milliseconds."""
    ms = [s * 1000 for s in seconds]
    return {
        "p50": round(percentile(ms, 0.50), 2),
        "p90": round(percentile(ms, 0.90), 2),
        "p99": round(percentile(ms, 0.99), 2),
        "mean": round(statistics.fmean(ms), 2) if ms else float("nan"),
        "min": round(min(ms), 2) if ms else float("nan"),
        "max": round(max(ms), 2) if ms else float("nan"),
    }


def cpu_seconds(pid: int) -> float | None:
    """User plus system CPU time used so far by process ``pid`` (Linux only)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    # After the command name: utime and stime are fields 14 and 15 of stat(5).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def postgres_cpu_seconds() -> float | None:
    """CPU time used so far by every local ``postgres`` process (Linux only).

    Only meaningful for a server on this machine; backends that exit between
    two readings take their time with them, so long-lived connections only.
    """
    proc = Path("/proc")
    if not proc.is_dir():
        return None
    total = 0.0
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
        except OSError:
            continue
        used = cpu_seconds(int(entry.name))
        if used is not None:
            total += used
    return total


# -- database -----------------------------------------------------------------
@contextmanager
def scratch_databases(admin_url: str) -> Iterator[DatabaseMaker]:
    """Yields a maker of fresh migrated databases; drops all of them afterwards."""
    maker = DatabaseMaker(admin_url)
    try:
        yield maker
    finally:
        maker.drop_all()


@dataclass
class DatabaseMaker:
    """Creates ``fl_bench_*`` databases by cloning one migrated template."""

    admin_url: str
    _template: str | None = None
    _created: list[str] = field(default_factory=list)

    def create(self) -> str:
        """A new database with forgeline's schema; returns its URL."""
        if self._template is None:
            self._template = self._new_name()
            self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(self._template)))
            self._created.append(self._template)
            asyncio.run(_migrate(self.url_of(self._template)))
        name = self._new_name()
        self._execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
                sql.Identifier(name), sql.Identifier(self._template)
            )
        )
        self._created.append(name)
        return self.url_of(name)

    def clone(self, url: str, timeout_s: float = 30.0) -> str:
        """A copy of the database at ``url`` (data included); returns its URL.

        PostgreSQL copies a database only while nobody is connected to it, so
        this retries until the source's last connections have gone.
        """
        source = url.partition("?")[0].rsplit("/", 1)[1]
        name = self._new_name()
        statement = sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(source)
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._execute(statement)
                break
            except psycopg.errors.ObjectInUse:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        self._created.append(name)
        return self.url_of(name)

    def url_of(self, name: str) -> str:
        """The URL of database ``name`` on the admin URL's server."""
        base, _, query = self.admin_url.partition("?")
        prefix = base.rsplit("/", 1)[0]
        return f"{prefix}/{name}" + (f"?{query}" if query else "")

    def drop_all(self) -> None:
        """Drop every database this maker created (clones before the template)."""
        for name in reversed(self._created):
            self._execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        self._created.clear()

    @staticmethod
    def _new_name() -> str:
        return f"fl_bench_{uuid.uuid4().hex[:10]}"

    def _execute(self, statement: sql.Composed) -> None:
        with psycopg.connect(self.admin_url, autocommit=True) as connection:
            connection.execute(statement)


async def _migrate(url: str) -> None:
    from forgeline.db import migrate
    from forgeline.db.engine import create_engine

    engine = create_engine(url, pool_size=1)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


# -- subprocesses -------------------------------------------------------------
def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: The admin key every benchmarked forgeline accepts (fresh each run), and its header.
BENCH_KEY = new_token()
AUTH = {"Authorization": f"Bearer {BENCH_KEY}"}
#: Limits far above any benchmark's load: the limiter still runs on every request.
UNLIMITED = {
    "admin_key": BENCH_KEY,
    "secret_key": "bench-secret-key",
    "rate_limit_per_key": "100000000/minute",
    "rate_limit_per_ip": "100000000/minute",
    "max_active_jobs_per_key": 1_000_000,
    "max_streams_per_key": 100_000,
}


def forgeline_env(**settings: object) -> dict[str, str]:
    """Our environment minus any ``FORGELINE_*``, plus the benchmark key and ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELINE_")}
    values = {**UNLIMITED, **settings}
    env.update({f"FORGELINE_{name.upper()}": str(value) for name, value in values.items()})
    return env


@dataclass
class Forgeline:
    """A ``python -m forgeline ARGS`` subprocess with its output in a log file."""

    args: list[str]
    env: dict[str, str]
    workdir: Path
    port: int | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0

    @property
    def log_path(self) -> Path:
        """Where the process's stdout and stderr go."""
        return self.workdir / f"forgeline-{self.args[0]}.log"

    @property
    def url(self) -> str:
        """Base URL of an ``api`` or ``serve`` process."""
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Forgeline:
        """Launch the command; ``started_at`` is the monotonic time just before."""
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forgeline", *self.args],
                env=self.env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def pid(self) -> int:
        """The process id (after ``start``)."""
        if self.process is None:
            raise RuntimeError("not started")
        return self.process.pid

    def wait_ready(self, timeout_s: float = 60.0, poll_s: float = 0.02) -> float:
        """Poll ``/readyz`` until 200; return seconds since launch. Raises on exit or timeout."""
        if self.process is None:
            raise RuntimeError("not started")
        deadline = self.started_at + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"forgeline {self.args[0]} exited with {self.process.returncode}:\n"
                        + self.output()[-3000:]
                    )
                try:
                    if client.get(f"{self.url}/readyz").status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise RuntimeError(f"forgeline not ready after {timeout_s} s:\n{self.output()[-3000:]}")

    def output(self) -> str:
        """Everything the process printed so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM, then SIGKILL past ``timeout_s``; returns the exit status."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode


@contextmanager
def workdir(prefix: str, keep: bool = False) -> Iterator[Path]:
    """An empty temporary directory, removed afterwards unless ``keep``."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        if keep:
            print(f"(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)
