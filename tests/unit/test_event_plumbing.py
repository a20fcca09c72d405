"""Pure parts of streaming: subscriptions, notification payloads, the SSE parser."""

from __future__ import annotations

import asyncio
import json
import uuid

from forgeline.client import _parse_sse
from forgeline.events.hub import EventHub, Subscription
from forgeline.events.log import MAX_PAYLOAD_BYTES, notification_payloads
from forgeline.events.models import Event, EventType


def _event(seq: int, text: str = "t") -> Event:
    return Event(seq, EventType.TOKEN, {"text": text})


async def test_subscription_delivers_batches_in_order() -> None:
    """Batches pushed to a subscription come out in the order they went in."""
    subscription = Subscription(uuid.uuid4())
    subscription.push([_event(1)])
    subscription.push([_event(2)])
    assert await subscription.next(1) == [_event(1)]
    assert await subscription.next(1) == [_event(2)]


async def test_overflowing_subscription_asks_for_a_reread() -> None:
    """A reader too slow to keep up is told to re-read the table, not fed stale batches."""
    subscription = Subscription(uuid.uuid4(), max_batches=3)
    for seq in range(1, 5):
        subscription.push([_event(seq)])
    assert await subscription.next(1) is None


async def test_silence_returns_none_after_the_timeout() -> None:
    """With nothing pushed, ``next`` returns None (re-read) after its timeout."""
    assert await Subscription(uuid.uuid4()).next(0.01) is None


def test_small_batches_travel_in_the_notification() -> None:
    """A batch under the size limit is carried whole in the payload."""
    job_id = uuid.uuid4()
    [payload] = notification_payloads({job_id: [_event(1), _event(2)]})
    [entry] = json.loads(payload)
    assert entry["job"] == str(job_id)
    assert entry["last"] == 2
    assert [item["seq"] for item in entry["events"]] == [1, 2]


def test_large_batches_send_only_their_range() -> None:
    """A batch over the limit is announced by range; followers read the table."""
    [payload] = notification_payloads({uuid.uuid4(): [_event(7, "x" * MAX_PAYLOAD_BYTES)]})
    assert len(payload.encode()) < MAX_PAYLOAD_BYTES
    [entry] = json.loads(payload)
    assert entry["last"] == 7
    assert "events" not in entry


def test_many_jobs_share_payloads_under_the_limit() -> None:
    """Batches of many jobs are packed into as few payloads as fit, none too large."""
    batches = {uuid.uuid4(): [_event(seq, "y" * 300)] for seq in range(1, 101)}
    payloads = notification_payloads(batches)
    assert 1 < len(payloads) < 10
    assert all(len(p.encode()) <= MAX_PAYLOAD_BYTES for p in payloads)
    entries = [entry for p in payloads for entry in json.loads(p)]
    assert [entry["job"] for entry in entries] == [str(job_id) for job_id in batches]
    assert all(len(entry["events"]) == 1 for entry in entries)


async def test_hub_routes_notifications_to_the_job_subscribers_only() -> None:
    """A notification wakes the subscribers of its job and nobody else's."""
    hub = EventHub("postgresql://unused")
    mine, other, third = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    with hub.subscribe(mine) as subscription, hub.subscribe(other) as bystander:
        [payload] = notification_payloads({mine: [_event(1)], third: [_event(4)]})
        hub._dispatch(payload)
        assert await subscription.next(1) == [_event(1)]
        assert await bystander.next(0.01) is None
        assert hub.subscriber_count == 2
    assert hub.subscriber_count == 0


async def test_hub_ignores_malformed_notifications() -> None:
    """Garbage on the channel is logged and dropped, not raised."""
    hub = EventHub("postgresql://unused")
    with hub.subscribe(uuid.uuid4()) as subscription:
        hub._dispatch("not json")
        hub._dispatch(json.dumps([{"job": "not-a-uuid"}]))
        hub._dispatch(json.dumps({"job": str(uuid.uuid4())}))
        assert await asyncio.wait_for(subscription.next(0.01), 1) is None


def test_sse_parser_reads_events_and_skips_comments() -> None:
    """The client's SSE parser yields id, event and JSON data, ignoring heartbeats."""
    lines = [
        ": ping",
        "",
        "id: 3",
        "event: token",
        'data: {"text": "hi"}',
        "",
        "event: reconnect",
        "retry: 1000",
        'data: {"after": 3}',
        "",
    ]
    events = list(_parse_sse(iter(lines)))
    assert [(e.seq, e.type, e.data) for e in events] == [
        (3, "token", {"text": "hi"}),
        (0, "reconnect", {"after": 3}),
    ]
