"""A small client of forgeline's HTTP API, used by the CLI.

It follows a job's event stream over SSE and resumes with ``Last-Event-ID``
after a dropped connection or a server restart, so the caller sees each
event exactly once.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx

from forgeline.errors import ForgelineError


class ClientError(ForgelineError):
    """The server refused a request or could not be reached."""

    code = "client_error"


@dataclass(frozen=True)
class StreamEvent:
    """One event received from a job's stream."""

    seq: int
    type: str
    data: dict[str, Any]


def error_message(response: httpx.Response) -> str:
    """The message of an error envelope, or a description of the response."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code} from {response.request.url}"


class ForgelineClient:
    """Submits jobs and follows their streams on a forgeline server."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        reconnect_for_s: float = 120.0,
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.base_url = base_url.rstrip("/")
        self.reconnect_for_s = reconnect_for_s
        self._http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout_s)

    def close(self) -> None:
        """Release the connection pool."""
        self._http.close()

    def submit(self, pipeline: str, job_input: dict[str, Any]) -> dict[str, Any]:
        """Submit a job and return it as the server described it."""
        try:
            response = self._http.post(
                "/api/v1/jobs", json={"pipeline": pipeline, "input": job_input}
            )
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach forgeline at {self.base_url}: {exc}") from None
        if response.status_code >= 400:
            raise ClientError(error_message(response))
        job: dict[str, Any] = response.json()
        return job

    def events(self, job_id: str, *, after: int = 0) -> Iterator[StreamEvent]:
        """Every event of the job after ``after``, resuming across disconnects."""
        last = after
        failing_since: float | None = None
        while True:
            try:
                for event in self._read_stream(job_id, last):
                    failing_since = None
                    if event.type == "reconnect":
                        break  # the server is going away; resume elsewhere
                    last = event.seq
                    yield event
                    if event.type == "final":
                        return
            except (httpx.TransportError, httpx.RemoteProtocolError) as exc:
                now = time.monotonic()
                failing_since = failing_since or now
                if now - failing_since > self.reconnect_for_s:
                    raise ClientError(f"lost the stream of job {job_id}: {exc}") from None
                time.sleep(0.5)

    def _read_stream(self, job_id: str, after: int) -> Iterator[StreamEvent]:
        headers = {"Last-Event-ID": str(after), "Accept": "text/event-stream"}
        timeout = httpx.Timeout(30.0, read=60.0)
        with self._http.stream(
            "GET", f"/api/v1/jobs/{job_id}/events", headers=headers, timeout=timeout
        ) as response:
            if response.status_code >= 500:
                raise httpx.RemoteProtocolError(f"server answered {response.status_code}")
            if response.status_code >= 400:
                response.read()
                raise ClientError(error_message(response))
            yield from _parse_sse(response.iter_lines())


def _parse_sse(lines: Iterator[str]) -> Iterator[StreamEvent]:
    """Server-sent events from text lines (comments and unknown fields ignored)."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                seq = int(fields.get("id") or 0)
                yield StreamEvent(seq, fields.get("event", "message"), json.loads("\n".join(data)))
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        else:
            fields[name] = value
