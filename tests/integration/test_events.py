"""The event log: append, replay, live follow, batching, compaction."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any, cast

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from forgeline.db.tables import JobRow
from forgeline.events.emitter import EventWriter
from forgeline.events.hub import EventHub
from forgeline.events.log import append_events, compact_finished, read_events
from forgeline.events.models import Event, EventType
from forgeline.events.stream import StreamInterrupted, follow
from forgeline.runtime import Runtime


@pytest.fixture
async def job_id(runtime: Runtime) -> uuid.UUID:
    """A stored job (its log holds the 'queued' status event)."""
    submission = await runtime.jobs.submit(owner=None, pipeline="echo", job_input={})
    return submission.job.id


@pytest.fixture
async def hub(runtime: Runtime) -> AsyncIterator[EventHub]:
    """A started hub, connected to the test database."""
    runtime.hub.start()
    await asyncio.wait_for(runtime.hub.connected.wait(), timeout=10)
    yield runtime.hub
    await runtime.hub.stop()


async def _append(runtime: Runtime, job_id: uuid.UUID, *events: tuple[EventType, dict]) -> None:
    async with runtime.sessions.begin() as session:
        await append_events(session, job_id, list(events))


async def _collect(stream: AsyncIterator[Event]) -> list[Event]:
    return [event async for event in stream]


async def test_concurrent_appends_get_contiguous_sequence_numbers(
    runtime: Runtime, job_id: uuid.UUID
) -> None:
    """Writers appending at once never reuse or skip a sequence number."""
    await asyncio.gather(
        *(
            _append(runtime, job_id, (EventType.LOG, {"n": i}), (EventType.LOG, {"n": i}))
            for i in range(20)
        )
    )
    async with runtime.sessions() as session:
        events = await read_events(session, job_id)
    assert [e.seq for e in events] == list(range(1, 42))


async def test_follow_replays_then_streams_live_until_final(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID
) -> None:
    """A follower gets the backlog, then live events, and stops after the final one."""
    await _append(runtime, job_id, (EventType.TOKEN, {"text": "a"}))
    follower = asyncio.create_task(_collect(follow(hub, runtime.sessions, job_id)))
    await _append(runtime, job_id, (EventType.TOKEN, {"text": "b"}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    events = await asyncio.wait_for(follower, timeout=10)
    assert [e.seq for e in events] == [1, 2, 3, 4]
    assert [e.type for e in events][-1] is EventType.FINAL


async def test_follow_from_a_sequence_number_resumes_exactly(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID
) -> None:
    """Resuming after event k yields k+1 onwards: no gap, no duplicate."""
    for text in "abcd":
        await _append(runtime, job_id, (EventType.TOKEN, {"text": text}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    events = await asyncio.wait_for(_collect(follow(hub, runtime.sessions, job_id, after=3)), 10)
    assert [e.seq for e in events] == [4, 5, 6]


@pytest.mark.parametrize("after", [3, 7, 2**31 - 1])
async def test_follow_resumed_at_or_past_the_final_event_ends_at_once(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID, after: int
) -> None:
    """A client that has the final event already (or names a later one) gets nothing, at once."""
    await _append(runtime, job_id, (EventType.TOKEN, {"text": "a"}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    events = await asyncio.wait_for(
        _collect(follow(hub, runtime.sessions, job_id, after=after)), timeout=10
    )
    assert events == []


async def test_follow_survives_lost_notifications(runtime: Runtime, job_id: uuid.UUID) -> None:
    """With no LISTEN connection at all, followers still see every event by rechecking."""
    silent_hub = EventHub("postgresql://unused")  # never started: hears nothing
    follower = asyncio.create_task(
        _collect(follow(silent_hub, runtime.sessions, job_id, recheck_interval_s=0.1))
    )
    await _append(runtime, job_id, (EventType.TOKEN, {"text": "x"}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    events = await asyncio.wait_for(follower, timeout=10)
    assert [e.seq for e in events] == [1, 2, 3]


async def test_streams_opened_after_shutdown_began_end_at_once(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID
) -> None:
    """A follower that starts while the server stops is told to reconnect, not left waiting."""
    hub.interrupt_streams()
    with pytest.raises(StreamInterrupted) as interrupted:
        await asyncio.wait_for(_collect(follow(hub, runtime.sessions, job_id, after=1)), 5)
    assert interrupted.value.last_seq == 1


async def test_large_batches_are_read_from_the_table(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID
) -> None:
    """A batch too big for a notification still reaches the follower, whole."""
    follower = asyncio.create_task(_collect(follow(hub, runtime.sessions, job_id)))
    big = "x" * 20_000
    await _append(runtime, job_id, (EventType.TOKEN, {"text": big}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    events = await asyncio.wait_for(follower, timeout=10)
    assert events[1].data["text"] == big


async def test_stopping_interrupts_a_follower_with_its_position(
    runtime: Runtime, hub: EventHub, job_id: uuid.UUID
) -> None:
    """On shutdown a follower learns the last sequence number it delivered."""
    seen: list[int] = []

    async def consume() -> None:
        async for event in follow(hub, runtime.sessions, job_id):
            seen.append(event.seq)
            if event.seq == 2:
                hub.interrupt_streams()

    await _append(runtime, job_id, (EventType.TOKEN, {"text": "a"}))
    with pytest.raises(StreamInterrupted) as interrupted:
        await asyncio.wait_for(consume(), timeout=10)
    assert interrupted.value.last_seq == 2
    assert seen == [1, 2]


async def test_emitter_batches_tokens_in_order(runtime: Runtime, job_id: uuid.UUID) -> None:
    """Hundreds of deltas become a few token events whose text is the same, in order."""
    pieces = [f"{i} " for i in range(500)]
    writer = EventWriter(runtime.sessions, flush_interval_s=0.05)
    async with writer.emitter(job_id) as emitter:
        for index, piece in enumerate(pieces):
            await emitter.token(piece)
            if index == 250:
                await emitter.emit(EventType.PROGRESS, {"fraction": 0.5})
    async with runtime.sessions() as session:
        events = await read_events(session, job_id, after=1)
    tokens = [e for e in events if e.type is EventType.TOKEN]
    assert "".join(e.data["text"] for e in tokens) == "".join(pieces)
    assert len(tokens) < 20
    progress_at = next(i for i, e in enumerate(events) if e.type is EventType.PROGRESS)
    before = "".join(e.data["text"] for e in events[:progress_at] if e.type is EventType.TOKEN)
    assert before == "".join(pieces[:251])


async def test_progress_is_written_in_order_and_stored_on_the_running_job(
    runtime: Runtime, job_id: uuid.UUID
) -> None:
    """Queued progress follows the text before it and lands on the job's row in the same write."""
    async with runtime.sessions.begin() as session:
        await session.execute(update(JobRow).where(JobRow.id == job_id).values(status="running"))
    writer = EventWriter(runtime.sessions, flush_interval_s=0.05)
    async with writer.emitter(job_id) as emitter:
        for index in range(300):
            await emitter.token(f"{index} ")
            if index in (99, 199):
                await emitter.progress((index + 1) / 300)
    async with runtime.sessions() as session:
        events = await read_events(session, job_id, after=1)
        stored = await session.scalar(select(JobRow.progress).where(JobRow.id == job_id))
    assert stored == pytest.approx(200 / 300)
    marks = [i for i, e in enumerate(events) if e.type is EventType.PROGRESS]
    assert [events[i].data["fraction"] for i in marks] == [0.3333, 0.6667]
    for mark, last in zip(marks, (99, 199), strict=True):
        text = "".join(e.data["text"] for e in events[:mark] if e.type is EventType.TOKEN)
        assert text == "".join(f"{i} " for i in range(last + 1))


async def test_emitter_flushes_a_pause_within_the_interval(
    runtime: Runtime, job_id: uuid.UUID
) -> None:
    """A token followed by silence is written without waiting for the next one."""
    writer = EventWriter(runtime.sessions, flush_interval_s=0.05)
    async with writer.emitter(job_id) as emitter:
        await emitter.token("alone")
        for _ in range(100):
            async with runtime.sessions() as session:
                if await read_events(session, job_id, after=1):
                    break
            await asyncio.sleep(0.02)
        else:
            pytest.fail("the token was not flushed within 2 s")


async def test_writer_flushes_many_jobs_in_one_transaction(runtime: Runtime) -> None:
    """Tokens of concurrent jobs go out together, each job's log whole and contiguous."""
    jobs = [
        (await runtime.jobs.submit(owner=None, pipeline="echo", job_input={})).job.id
        for _ in range(20)
    ]
    writer = EventWriter(runtime.sessions, flush_interval_s=0.05)
    transactions = 0
    real_begin = runtime.sessions.begin

    def counting_begin() -> object:
        nonlocal transactions
        transactions += 1
        return real_begin()

    writer.sessions = cast(Any, SimpleNamespace(begin=counting_begin))

    async def generate(job: uuid.UUID) -> None:
        async with writer.emitter(job) as emitter:
            for i in range(50):
                await emitter.token(f"{i} ")
                await asyncio.sleep(0.002)

    await asyncio.gather(*(generate(job) for job in jobs))
    await writer.close()
    for job in jobs:
        async with runtime.sessions() as session:
            events = await read_events(session, job)
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
        text = "".join(e.data["text"] for e in events if e.type is EventType.TOKEN)
        assert text == "".join(f"{i} " for i in range(50))
    # 20 jobs x 50 deltas over ~0.1-0.5 s: a handful of ticks, not a write per job per tick.
    assert transactions < 40


async def test_a_failed_flush_fails_the_attempt_it_carried(
    runtime: Runtime, job_id: uuid.UUID
) -> None:
    """A flush that cannot reach the database raises in the job's next emitter call."""
    writer = EventWriter(runtime.sessions, flush_interval_s=0.01)

    def broken_begin() -> object:
        raise OperationalError("INSERT", {}, Exception("connection lost"))

    writer.sessions = cast(Any, SimpleNamespace(begin=broken_begin))
    emitter = writer.emitter(job_id)
    await emitter.token("lost")
    await asyncio.sleep(0.1)
    with pytest.raises(OperationalError):
        await emitter.token("more")


async def test_compaction_keeps_only_the_final_event_of_old_jobs(
    runtime: Runtime, job_id: uuid.UUID
) -> None:
    """Old finished jobs keep their final event; running jobs keep everything."""
    running = (await runtime.jobs.submit(owner=None, pipeline="echo", job_input={})).job.id
    for target in (job_id, running):
        await _append(runtime, target, (EventType.TOKEN, {"text": "t"}))
    await _append(runtime, job_id, (EventType.FINAL, {"status": "succeeded"}))
    async with runtime.sessions.begin() as session:
        await session.execute(
            update(JobRow)
            .where(JobRow.id == job_id)
            .values(status="succeeded", finished_at=JobRow.created_at - dt.timedelta(hours=2))
        )
        removed = await compact_finished(session, older_than_s=3600)
    assert removed == 2
    async with runtime.sessions() as session:
        assert [e.type for e in await read_events(session, job_id)] == [EventType.FINAL]
        assert len(await read_events(session, running)) == 2
