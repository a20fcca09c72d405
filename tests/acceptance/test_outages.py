"""RELIABILITY item 8: PostgreSQL down for two minutes, then Redis.

No process restarts, /readyz says 503 naming the failing check while
/healthz stays 200, everything recovers by itself, and no accepted job is
lost: jobs running when the database went away finish after it is back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from forgeline.jobs.queue import POOL_WAIT_S
from tests.acceptance.conftest import ProcessFactory
from tests.acceptance.test_streams import long_story, story_input, submit
from tests.support.auth import AUTH
from tests.support.openai_server import OpenAIServer
from tests.support.processes import ForgelineProcess
from tests.support.servers import PrivatePostgres, PrivateRedis

DATABASE_OUTAGE_S = 120.0
#: FORGELINE_DRAIN_TIMEOUT_S of the test processes (tests/conftest.py).
TEST_DRAIN_S = 2.0
REDIS_OUTAGE_S = 20.0


@pytest.fixture
def postgres() -> Iterator[PrivatePostgres]:
    server = PrivatePostgres()
    server.start()
    yield server
    server.remove()


@pytest.fixture
def redis() -> Iterator[PrivateRedis]:
    server = PrivateRedis()
    server.start()
    yield server
    server.stop()


def readiness(process: ForgelineProcess) -> tuple[int, dict[str, Any]]:
    response = httpx.get(f"{process.url}/readyz", timeout=10)
    return response.status_code, response.json()


def wait_ready_again(process: ForgelineProcess, timeout_s: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if readiness(process)[0] == 200:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"not ready {timeout_s} s after the outage: {readiness(process)}")


def ride_out(process: ForgelineProcess, seconds: float, failing: str) -> None:
    """For ``seconds``: readiness 503 naming ``failing``, liveness 200, the process alive."""
    deadline = time.monotonic() + seconds
    polls = 0
    while time.monotonic() < deadline:
        status, body = readiness(process)
        if polls > 0 or not body["checks"][failing]["ok"]:  # the first poll may predate it
            assert status == 503, body
            assert body["checks"][failing]["ok"] is False, body
        assert httpx.get(f"{process.url}/healthz", timeout=10).status_code == 200
        assert process.process.poll() is None, process.output()[-3000:]
        polls += 1
        time.sleep(2)


@pytest.mark.slow
def test_database_then_redis_outage_is_ridden_out(
    start_forgeline: ProcessFactory,
    openai_server: OpenAIServer,
    postgres: PrivatePostgres,
    redis: PrivateRedis,
) -> None:
    long_story(openai_server, 100, per_second=20)  # 5 s a job
    serve = start_forgeline(
        "serve", database_url=postgres.url, redis_url=redis.url, auto_migrate="true"
    )
    jobs = [submit(serve.url, story_input(100)) for _ in range(3)]
    time.sleep(1)  # they are running

    postgres.stop()
    ride_out(serve, DATABASE_OUTAGE_S, "database")
    postgres.start()
    recovered_s = wait_ready_again(serve, 60)

    deadline = time.monotonic() + 120
    statuses: dict[str, str] = {}
    while time.monotonic() < deadline:
        statuses = {
            job: httpx.get(f"{serve.url}/api/v1/jobs/{job}", headers=AUTH, timeout=10).json()[
                "status"
            ]
            for job in jobs
        }
        if all(status == "succeeded" for status in statuses.values()):
            break
        time.sleep(1)
    assert set(statuses.values()) == {"succeeded"}, statuses

    redis.stop()
    ride_out(serve, REDIS_OUTAGE_S, "redis")
    # The limiter lets requests through while its store is away.
    assert httpx.get(f"{serve.url}/api/v1/jobs", headers=AUTH, timeout=10).status_code == 200
    redis.start()
    wait_ready_again(serve, 30)
    assert serve.process.poll() is None
    print(f"ready again {recovered_s:.1f} s after PostgreSQL came back")
    # Stopped here, while its database and Redis still run (the fixtures stop them
    # first at teardown): a clean drain after the outages, inside the grace budget.
    started = time.monotonic()
    assert serve.stop(timeout_s=30) == 0
    print(f"stopped in {time.monotonic() - started:.1f} s")


@pytest.mark.slow
def test_a_stop_while_the_database_is_down_stays_inside_the_drain_budget(
    start_forgeline: ProcessFactory, openai_server: OpenAIServer, postgres: PrivatePostgres
) -> None:
    """SIGTERM with PostgreSQL gone: the process still exits 0, within drain + a few seconds.

    The queue's worker unregisters itself through a pooled connection on its
    way out; with no database that wait must be short, or the orchestrator's
    grace period runs out and the process is killed.
    """
    long_story(openai_server, 100, per_second=20)  # 5 s a job
    serve = start_forgeline("serve", database_url=postgres.url, auto_migrate="true")
    submit(serve.url, story_input(100))
    time.sleep(1)  # it is running
    postgres.stop()
    time.sleep(2)

    started = time.monotonic()
    assert serve.stop(timeout_s=30) == 0, serve.output()[-3000:]
    stopped_s = time.monotonic() - started
    print(f"stopped in {stopped_s:.1f} s with the database down")
    assert stopped_s < TEST_DRAIN_S + POOL_WAIT_S + 5
