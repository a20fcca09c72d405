"""The queue's retry strategy: retry exactly when the runner asks, or after a shutdown."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable

import pytest
from procrastinate import RetryDecision
from procrastinate.exceptions import JobRetry
from procrastinate.jobs import Job as QueueJob

from forgeline.errors import BackendUnavailableError
from forgeline.jobs.queue import QUEUE_NAME, TASK_NAME, RetryLater, RunnerRetryStrategy


@pytest.fixture
def make_queue_job() -> Callable[..., QueueJob]:
    """Builds the Procrastinate job of a forgeline run, as the worker sees it."""

    def make(*, attempts: int = 0) -> QueueJob:
        return QueueJob(
            id=1,
            queue=QUEUE_NAME,
            lock=None,
            queueing_lock=None,
            task_name=TASK_NAME,
            task_kwargs={"job_id": "0b4c2f8e-4f6a-4d7e-9a3c-2f1e0d9c8b7a"},
            attempts=attempts,
        )

    return make


def decide(exception: BaseException, job: QueueJob) -> tuple[RetryDecision | None, dt.datetime]:
    """The strategy's decision, and the time just before it was asked."""
    before = dt.datetime.now(dt.UTC)
    return RunnerRetryStrategy().get_retry_decision(exception=exception, job=job), before


@pytest.mark.parametrize("delay_s", [1.0, 8.0, 300.0])
def test_retry_later_retries_after_its_delay(
    make_queue_job: Callable[..., QueueJob], delay_s: float
) -> None:
    """RetryLater(d) schedules the job d seconds from now, on the same queue and priority."""
    decision, before = decide(RetryLater(delay_s), make_queue_job())
    after = dt.datetime.now(dt.UTC)

    assert decision is not None
    assert decision.retry_at is not None
    delay = dt.timedelta(seconds=delay_s)
    assert before + delay <= decision.retry_at <= after + delay
    assert (decision.queue, decision.priority, decision.lock) == (None, None, None)


def test_retry_later_zero_retries_now(make_queue_job: Callable[..., QueueJob]) -> None:
    """A zero delay (no backoff configured) retries at once."""
    decision, before = decide(RetryLater(0.0), make_queue_job())

    assert decision is not None
    assert decision.retry_at is not None
    assert before <= decision.retry_at <= dt.datetime.now(dt.UTC)


def test_retry_later_keeps_a_sub_second_delay(make_queue_job: Callable[..., QueueJob]) -> None:
    """A fractional delay is honoured, not rounded away to zero."""
    decision, before = decide(RetryLater(0.4), make_queue_job())

    assert decision is not None
    assert decision.retry_at is not None
    assert decision.retry_at >= before + dt.timedelta(seconds=0.4)


def test_cancelled_error_retries_now(make_queue_job: Callable[..., QueueJob]) -> None:
    """A job cancelled by the worker's shutdown is handed back for immediate retry."""
    decision, before = decide(asyncio.CancelledError(), make_queue_job(attempts=2))

    assert decision is not None
    assert decision.retry_at is not None
    assert before <= decision.retry_at <= dt.datetime.now(dt.UTC)


@pytest.mark.parametrize(
    "exception",
    [
        RuntimeError("pipeline bug"),
        ValueError("bad"),
        BackendUnavailableError("model server down"),
        KeyboardInterrupt(),
    ],
)
def test_any_other_exception_is_not_retried(
    make_queue_job: Callable[..., QueueJob], exception: BaseException
) -> None:
    """Only the runner decides retries: every other exception means no retry."""
    decision, _ = decide(exception, make_queue_job())

    assert decision is None


def test_procrastinate_turns_the_decision_into_a_job_retry(
    make_queue_job: Callable[..., QueueJob],
) -> None:
    """Through Procrastinate's own entry point, RetryLater becomes JobRetry and others nothing."""
    strategy = RunnerRetryStrategy()
    job = make_queue_job()

    retry = strategy.get_retry_exception(RetryLater(5.0), job)

    assert isinstance(retry, JobRetry)
    assert strategy.get_retry_exception(RuntimeError("boom"), job) is None


def test_lost_database_retries_after_a_pause(make_queue_job: Callable[..., QueueJob]) -> None:
    """A delivery that lost the database is delivered again, so its state gets written."""
    from sqlalchemy.exc import OperationalError

    decision, before = decide(OperationalError("SELECT 1", {}, Exception("gone")), make_queue_job())

    assert decision is not None
    assert decision.retry_at is not None
    assert decision.retry_at >= before + dt.timedelta(seconds=1)
