"""Live job output: ``/api/v1/jobs/{id}/events`` (SSE) and ``/api/v1/jobs/{id}/ws``.

Both replay the job's log after the client's last sequence number, then
follow it live until the final event. On shutdown the stream ends with a
``reconnect`` event carrying the last sequence number sent, so the client
resumes on another replica with no gap and no duplicate.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Header, Query, Request, WebSocket, WebSocketDisconnect
from pydantic import WithJsonSchema
from sse_starlette import EventSourceResponse, ServerSentEvent

from forgeline.api.deps import JobsDep, KeyDep, RuntimeDep, authenticate_ws, get_runtime_ws
from forgeline.api.schemas import ErrorEnvelope
from forgeline.auth import ApiKey
from forgeline.errors import ConflictError, ForgelineError, InvalidInputError, RateLimitedError
from forgeline.events.stream import StreamInterrupted, follow
from forgeline.jobs.models import Job
from forgeline.runtime import Runtime

router = APIRouter(prefix="/api/v1/jobs", tags=["events"])
logger = structlog.get_logger("forgeline.api")

#: Seconds between SSE heartbeat comments (proxies drop idle connections).
HEARTBEAT_S = 15.0
#: After shutdown starts, how long a stream may take to send its farewell.
FAREWELL_GRACE_S = 5.0
#: After the last stream of a cancel_on_disconnect job closes, how long a client
#: has to reconnect (to any replica) before the job is cancelled.
RECONNECT_GRACE_S = 1.0
#: WebSocket close code for "server restarting, reconnect" (RFC 6455 registry).
WS_SERVICE_RESTART = 1012
WS_UNAUTHORIZED = 4401
WS_NOT_FOUND = 4404
WS_RATE_LIMITED = 4429
WS_BAD_REQUEST = 4400
#: The largest event sequence number (the column is a 32-bit integer).
MAX_SEQ = 2**31 - 1
LAST_EVENT_ID_PATTERN = r"^[0-9]{1,20}$"
#: How long a WebSocket client has to send its ``{"after": N}`` message.
WS_HELLO_TIMEOUT_S = 10.0


class StreamSlots:
    """Open streams per key in this process, capped at ``FORGELINE_MAX_STREAMS_PER_KEY``."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: Counter[uuid.UUID] = Counter()

    def check(self, key: ApiKey) -> None:
        """429 when ``key`` already holds its cap of streams here."""
        if self._open[key.id] >= self.cap:
            raise RateLimitedError(
                f"key {key.prefix} already has {self.cap} open streams on this server",
                retry_after_s=5,
            )

    @contextlib.contextmanager
    def hold(self, key: ApiKey) -> Iterator[None]:
        """Count one open stream of ``key`` for the ``with`` block."""
        self._open[key.id] += 1
        try:
            yield
        finally:
            self._open[key.id] -= 1
            if not self._open[key.id]:
                del self._open[key.id]


def _start_after(last_event_id: str | None, after: int | None) -> int:
    if last_event_id is not None:
        # Digits only (the header's pattern); past the last possible sequence
        # number it means what any id past the job's last event means: after all.
        return min(int(last_event_id), MAX_SEQ)
    return after or 0


@contextlib.asynccontextmanager
async def _watching(request_state: Any, runtime: Runtime, job: Job) -> AsyncIterator[list[bool]]:
    """Count this stream among the job's watchers (every replica's) while it is open.

    For a ``cancel_on_disconnect`` job only. The caller sets ``finished[0]``
    when the stream reached the final event (or a shutdown's "reconnect");
    otherwise the client left, and if no stream anywhere is left after a
    short grace (a reconnect to another replica), the job is cancelled.
    """
    finished = [False]
    if not job.cancel_on_disconnect:
        yield finished
        return
    await runtime.jobs.watch(job.id, +1)
    try:
        yield finished
    finally:
        # Not awaited here: the stream is being closed or cancelled.
        tasks: set[asyncio.Task[None]] = request_state.background_tasks
        task = asyncio.create_task(_unwatch(runtime, job, left=not finished[0]))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def _unwatch(runtime: Runtime, job: Job, *, left: bool) -> None:
    if await runtime.jobs.watch(job.id, -1) > 0 or not left:
        return
    await asyncio.sleep(RECONNECT_GRACE_S)
    if await runtime.jobs.watch(job.id, 0) > 0:
        return  # the client came back, here or on another replica
    with contextlib.suppress(ConflictError):
        await runtime.jobs.cancel(job.id, owner=job.owner)
        logger.info(
            "job cancelled on disconnect", action="cancel_on_disconnect", job_id=str(job.id)
        )


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "The job's event stream."},
        404: {"model": ErrorEnvelope, "description": "No such job (or not yours)."},
        422: {"model": ErrorEnvelope, "description": "Invalid Last-Event-ID or after."},
    },
)
async def stream_events(
    job_id: str,
    request: Request,
    jobs: JobsDep,
    key: KeyDep,
    runtime: RuntimeDep,
    last_event_id: Annotated[
        str | None,
        Header(pattern=LAST_EVENT_ID_PATTERN),
        # A header is absent or a string, never null: say so in the document.
        WithJsonSchema({"type": "string", "pattern": LAST_EVENT_ID_PATTERN}),
    ] = None,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> EventSourceResponse:
    """Server-sent events: replay after ``Last-Event-ID`` (or ``after``), then live."""
    start = _start_after(last_event_id, after)
    job = await jobs.get(job_id, owner=key.owner, artifacts=False)
    streams: StreamSlots = request.app.state.streams
    streams.check(key)

    async def events() -> AsyncIterator[ServerSentEvent]:
        last = start
        with streams.hold(key):
            async with _watching(request.app.state, runtime, job) as finished:
                try:
                    # aclosing: leave the subscription as soon as the client does.
                    async with contextlib.aclosing(
                        follow(runtime.hub, runtime.sessions, job.id, after=start)
                    ) as followed:
                        async for event in followed:
                            last = event.seq
                            yield ServerSentEvent(
                                data=json.dumps(event.data),
                                event=event.type.value,
                                id=str(event.seq),
                            )
                    finished[0] = True
                except StreamInterrupted:
                    finished[0] = True
                    yield ServerSentEvent(
                        data=json.dumps({"after": last, "reason": "server shutting down"}),
                        event="reconnect",
                        retry=1000,
                    )

    return EventSourceResponse(
        events(),
        ping=HEARTBEAT_S,
        headers={"X-Accel-Buffering": "no", "Cache-Control": "no-cache"},
        shutdown_grace_period=FAREWELL_GRACE_S,
    )


@router.websocket("/{job_id}/ws")
async def stream_websocket(
    websocket: WebSocket,
    job_id: str,
    after: Annotated[int | None, Query(ge=0, le=MAX_SEQ)] = None,
) -> None:
    """The same stream over a WebSocket: JSON messages ``{"seq", "type", "data"}``.

    Give the last sequence number you have as ``?after=N``, or as a first
    message ``{"after": N}``.
    """
    runtime = get_runtime_ws(websocket)
    try:
        key = await authenticate_ws(websocket)
    except RateLimitedError as exc:
        await websocket.close(code=WS_RATE_LIMITED, reason=exc.message[:120])
        return
    except ForgelineError as exc:
        await websocket.close(code=WS_UNAUTHORIZED, reason=exc.message[:120])
        return
    try:
        job = await runtime.jobs.get(job_id, owner=key.owner, artifacts=False)
    except ForgelineError:
        await websocket.close(code=WS_NOT_FOUND, reason="no such job")
        return
    streams: StreamSlots = websocket.app.state.streams
    try:
        streams.check(key)
    except RateLimitedError as exc:
        await websocket.close(code=WS_RATE_LIMITED, reason=exc.message[:120])
        return
    await websocket.accept()
    try:
        start = after if after is not None else await _receive_after(websocket)
    except (InvalidInputError, TimeoutError) as exc:
        await websocket.close(code=WS_BAD_REQUEST, reason=str(exc) or 'expected {"after": N}')
        return
    with streams.hold(key):
        async with _watching(websocket.app.state, runtime, job) as finished:
            finished[0] = await _run_websocket(websocket, runtime, job, start)


async def _run_websocket(websocket: WebSocket, runtime: Runtime, job: Job, start: int) -> bool:
    """Stream until the end, the client leaves or shutdown; True unless the client left."""
    sender = asyncio.create_task(_send_events(websocket, runtime, job, start))
    # The client may leave while the job is silent: notice it without waiting
    # for the next event.
    listener = asyncio.create_task(_until_disconnect(websocket))
    done, _ = await asyncio.wait({sender, listener}, return_when=asyncio.FIRST_COMPLETED)
    for task in (sender, listener):
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, WebSocketDisconnect, RuntimeError):
            await task
    return sender in done and not sender.cancelled() and sender.exception() is None


async def _send_events(websocket: WebSocket, runtime: Runtime, job: Job, start: int) -> None:
    last = start
    try:
        async with contextlib.aclosing(
            follow(runtime.hub, runtime.sessions, job.id, after=start)
        ) as followed:
            async for event in followed:
                last = event.seq
                await websocket.send_json(event.as_json())
        await websocket.close()
    except StreamInterrupted:
        await websocket.send_json(
            {"type": "reconnect", "data": {"after": last, "reason": "server shutting down"}}
        )
        await websocket.close(code=WS_SERVICE_RESTART)


async def _until_disconnect(websocket: WebSocket) -> None:
    while (await websocket.receive())["type"] != "websocket.disconnect":
        pass


async def _receive_after(websocket: WebSocket) -> int:
    message = await asyncio.wait_for(websocket.receive_text(), timeout=WS_HELLO_TIMEOUT_S)
    try:
        value = json.loads(message)["after"]
    except (ValueError, KeyError, TypeError):
        raise InvalidInputError('first message must be {"after": N}') from None
    if type(value) is not int or not 0 <= value <= MAX_SEQ:
        raise InvalidInputError(f"after must be an integer from 0 to {MAX_SEQ}")
    return value
