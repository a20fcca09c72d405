"""Streaming overhead: tokens through forgeline versus straight from the model server.

Starts the OpenAI-compatible test server (``tests.support.openai_server``) as
its own process, pacing every reply at ``--tokens-per-second`` and making it
exactly ``--tokens`` pieces (words) long, then ``forgeline api`` and
``forgeline worker`` subprocesses on a fresh database, pointed at it, with
worker and backend concurrency at least the largest client count, so every
job of a round runs at once.

For each client count N, two rounds, one after the other:

direct
    N clients stream chat completions from the model server themselves
    (httpx, SSE), with the body the story pipeline sends.
forgeline
    N clients each submit a ``story`` job (``POST /api/v1/jobs``) and follow
    ``GET /api/v1/jobs/{id}/events`` to the ``final`` event.

Both sides count the same unit: the server's pieces (words) inside the
stream's text, so a forgeline ``token`` event that batches twelve pieces
counts twelve. Figures per round:

- delivered tokens/s: every token received, divided by the span from the
  first request sent to the last token received; the ratio forgeline/direct
  is the share of the model server's output rate a client still sees. It
  includes the start: at large N the submits and the queue pickups of a
  burst of jobs spread the first tokens over seconds.
- stream pace: each stream's tokens per second from its first token to its
  last (p50 and min): whether a stream, once started, keeps up with the model.
- TTFT: from the first request of a client (the submit, for forgeline) to
  its first token; "added" is forgeline's percentile minus direct's.
- NOTIFY rate: notifications on ``forgeline_events`` heard by a LISTEN
  connection of this process during the forgeline round, per second.
- CPU: seconds each process used during the round, as cores kept busy
  (PostgreSQL counts every local ``postgres`` process, others' included),
  and the time each spent runnable but waiting for a core (``schedstat``):
  a large wait means the figures were taken on a contended machine.
- TTFT by step, from the database's own timestamps: submit, queue pickup,
  first token write, delivery to the client.

Targets, reported beside the figures and never asserted: ratio >= 0.95 at
256 streams, added TTFT p50 <= 10 ms and p99 <= 50 ms (LiteLLM's proxy adds
p50 2-12 ms, p99 13-43 ms). The clients run in this process, on the same
cores as everything else; their CPU is reported too. Each client has its own
``httpx.AsyncClient`` (one shared pool for hundreds of streams adds a cost
that grows with their number, on both sides).

The machine may be shared: before measuring, the benchmark waits (up to
``--load-wait-s``, polling every 30 s) for the 1-minute load average to fall
below ``--max-load``, and reports the load average at the start and the end.

    python -m bench.streaming                                # N = 1, 64, 256; 50 tok/s x 200
    python -m bench.streaming --clients 1,8 --load-wait-s 0  # a quick smoke test
    python -m bench.streaming --tokens-per-second 100 --tokens 400 --json out.json
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.support import (
    AUTH,
    Forgeline,
    add_admin_url,
    base_parser,
    cpu_seconds,
    forgeline_env,
    free_port,
    machine_info,
    percentile,
    postgres_cpu_seconds,
    print_machine,
    scratch_databases,
    summary_ms,
    workdir,
    write_json,
)
from forgeline.events.log import CHANNEL
from forgeline.pipelines.story import SYSTEM_PROMPT, StoryInput, build_prompt

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The model the test server serves (``tests.support.openai_server.DEFAULT_MODEL``).
MODEL = "forgeline-test-model"
PROMPT = "a benchmark that counts every word"
#: Targets the figures are reported against (never asserted).
TARGET_RATIO = 0.95
TARGET_RATIO_AT = 256
TARGET_ADDED_P50_MS = 10.0
TARGET_ADDED_P99_MS = 50.0
#: How often, and at most how long, to wait for a quiet machine.
LOAD_POLL_S = 30.0
#: Pause between rounds, so one round's tail does not overlap the next.
SETTLE_S = 1.0
#: After a round, how long notifications still in flight get to arrive.
NOTIFY_DRAIN_S = 0.3
#: Database timestamps of each job's path to its first token (``now()``: transaction start).
TIMELINE = """
SELECT j.id::text,
       extract(epoch FROM j.created_at)::float8,
       extract(epoch FROM j.started_at)::float8,
       (SELECT extract(epoch FROM min(e.created_at))::float8
          FROM job_events e WHERE e.job_id = j.id AND e.type = 'token')
  FROM jobs j WHERE j.id = ANY(%s::uuid[])
"""


@dataclass
class Stream:
    """What one client saw; times are ``time.perf_counter()`` readings."""

    started: float
    first_token: float | None = None
    last_token: float | None = None
    tokens: int = 0
    #: SSE messages that carried text (chunks direct, ``token`` events through forgeline).
    text_events: int = 0
    submit_s: float | None = None
    status: str | None = None
    error: str | None = None
    #: Through forgeline: the job, and wall-clock times to line up with the database's.
    job_id: str | None = None
    wall_started: float = 0.0
    wall_first_token: float | None = None

    @property
    def ttft_s(self) -> float | None:
        """Seconds from the first request to the first token."""
        return None if self.first_token is None else self.first_token - self.started


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run every client count, print and save the figures."""
    parser = base_parser(__doc__.split("\n\n")[0])
    add_admin_url(parser)
    parser.add_argument(
        "--clients", default="1,64,256", help="concurrent streams per round, comma-separated"
    )
    parser.add_argument(
        "--tokens-per-second", type=float, default=50.0, help="pace of each model stream"
    )
    parser.add_argument("--tokens", type=int, default=200, help="tokens (words) per reply")
    parser.add_argument(
        "--db-pool-size", type=int, default=10, help="FORGELINE_DB_POOL_SIZE of api and worker"
    )
    parser.add_argument(
        "--workers", type=int, default=1, help="forgeline worker processes sharing the queue"
    )
    parser.add_argument(
        "--keys",
        type=int,
        default=1,
        help="API keys the clients take turns with (one key: every submit waits on its job cap)",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="FORGELINE_LOG_LEVEL of api and worker (info is what a deployment runs)",
    )
    parser.add_argument(
        "--max-load", type=float, default=1.5, help="start once the 1-minute load is below this"
    )
    parser.add_argument(
        "--load-wait-s", type=float, default=900.0, help="longest wait for that; 0: do not wait"
    )
    parser.add_argument("--timeout-s", type=float, default=120.0, help="longest a round may take")
    parser.add_argument("--keep", action="store_true", help="keep the processes' log files")
    args = parser.parse_args(argv)
    counts = [int(part) for part in args.clients.split(",") if part.strip()]
    if not counts or min(counts) < 1:
        parser.error("--clients: give positive counts, e.g. 1,64,256")
    try:
        StoryInput.model_validate({"prompt": PROMPT, "max_tokens": args.tokens})
    except ValueError:
        parser.error("--tokens: must be within the story pipeline's max_tokens (1 to 4096)")
    if args.tokens_per_second <= 0:
        parser.error("--tokens-per-second: must be positive")
    if args.workers < 1:
        parser.error("--workers: give at least 1")
    if args.keys < 1:
        parser.error("--keys: give at least 1")

    info = machine_info(args.admin_url)
    # The subprocesses inherit it: a prototype tree on PYTHONPATH is what runs.
    info["pythonpath"] = os.environ.get("PYTHONPATH")
    print("forgeline streaming: tokens through api + worker versus straight from the model server")
    print_machine(info)
    if info["pythonpath"]:
        print(f"PYTHONPATH  {info['pythonpath']} (forgeline imported from there, not the checkout)")
    print(
        f"load        {args.tokens} tokens per reply at {args.tokens_per_second:g} tokens/s per "
        f"stream; clients {', '.join(map(str, counts))}; workers {args.workers}; keys {args.keys}; "
        f"db pool {args.db_pool_size}; "
        f"log level {args.log_level}"
    )
    waited = wait_for_quiet(args.max_load, args.load_wait_s)
    load_start = os.getloadavg()
    print(f"load avg    {_loadavg(load_start)} at start (waited {waited:.0f} s)\n")

    started = time.monotonic()
    with scratch_databases(args.admin_url) as databases, workdir("fl-bench-", args.keep) as root:
        database_url = databases.create()
        rounds = run_all(args, counts, database_url, root)
    load_end = os.getloadavg()
    wall = time.monotonic() - started

    print_table(rounds, args.tokens_per_second)
    print(f"\nload avg    {_loadavg(load_start)} at start, {_loadavg(load_end)} at end")
    print(f"wall time   {wall:.0f} s (processes, warm-up and every round)")
    write_json(
        args.json,
        {
            "benchmark": "streaming",
            "machine": info,
            "tokens": args.tokens,
            "tokens_per_second": args.tokens_per_second,
            "clients": counts,
            "db_pool_size": args.db_pool_size,
            "workers": args.workers,
            "keys": args.keys,
            "log_level": args.log_level,
            "load_average": {"start": list(load_start), "end": list(load_end)},
            "wall_s": round(wall, 1),
            "targets": {
                "ratio_min": TARGET_RATIO,
                "ratio_at_clients": TARGET_RATIO_AT,
                "added_ttft_p50_ms_max": TARGET_ADDED_P50_MS,
                "added_ttft_p99_ms_max": TARGET_ADDED_P99_MS,
            },
            "rounds": rounds,
        },
    )


def wait_for_quiet(max_load: float, wait_s: float) -> float:
    """Wait until the 1-minute load average is below ``max_load``; seconds waited."""
    started = time.monotonic()
    while wait_s > 0 and os.getloadavg()[0] >= max_load:
        waited = time.monotonic() - started
        if waited >= wait_s:
            print(f"load avg    still {os.getloadavg()[0]:.2f} after {waited:.0f} s; going ahead")
            break
        print(f"load avg    {os.getloadavg()[0]:.2f} >= {max_load:g}; waiting", flush=True)
        time.sleep(min(LOAD_POLL_S, max(0.0, wait_s - waited)))
    return time.monotonic() - started


# -- processes ------------------------------------------------------------------
def run_all(args: Any, counts: list[int], database_url: str, root: Path) -> list[dict[str, Any]]:
    """Start the model server, api and worker; run every round; stop them."""
    widest = max(counts)
    model_port, api_port = free_port(), free_port()
    words = " ".join(f"w{i}" for i in range(args.tokens))
    model_log = (root / "model-server.log").open("ab")
    model = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.support.openai_server",
            "--port",
            str(model_port),
            "--pieces-per-second",
            str(args.tokens_per_second),
            "--text",
            words,
        ],
        cwd=REPO_ROOT,
        stdout=model_log,
        stderr=subprocess.STDOUT,
    )
    model_log.close()
    model_url = f"http://127.0.0.1:{model_port}/v1"
    settings: dict[str, object] = {
        "database_url": database_url,
        "auto_migrate": "false",
        "data_dir": root / "data",
        "storage_url": (root / "artifacts").as_uri(),
        "backend": "openai",
        "log_level": args.log_level,
        "openai_base_url": model_url,
        "openai_model": MODEL,
        "backend_max_concurrency": max(widest, 16),
        "worker_concurrency": max(widest, 8),
        "db_pool_size": args.db_pool_size,
    }
    api = Forgeline(["api"], forgeline_env(**settings, port=api_port), root, port=api_port)
    workers = [Forgeline(["worker"], forgeline_env(**settings), root) for _ in range(args.workers)]
    try:
        _wait_for_model_server(model, model_url)
        api.start()
        for worker in workers:
            worker.start()
        api.wait_ready()
        bench = Bench(
            model_url=model_url,
            api_url=api.url,
            database_url=database_url,
            tokens=args.tokens,
            keys=args.keys,
            pids={
                "api": api.pid,
                **{
                    "worker" if len(workers) == 1 else f"worker{i}": worker.pid
                    for i, worker in enumerate(workers, 1)
                },
                "model_server": model.pid,
            },
            timeout_s=args.timeout_s,
        )
        return asyncio.run(bench.run(counts, args.tokens_per_second))
    finally:
        for process in (api, *workers):
            process.stop()
        model.terminate()
        try:
            model.wait(timeout=10)
        except subprocess.TimeoutExpired:
            model.kill()
            model.wait(timeout=10)


def _wait_for_model_server(process: subprocess.Popen[bytes], url: str) -> None:
    deadline = time.monotonic() + 30.0
    with httpx.Client(timeout=2.0) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"the model server exited with {process.returncode}")
            with contextlib.suppress(httpx.HTTPError):
                if client.get(f"{url}/models").status_code == 200:
                    return
            time.sleep(0.05)
    raise RuntimeError("the model server did not start within 30 s")


# -- the rounds -----------------------------------------------------------------
class Bench:
    """Runs the rounds from one event loop, with a LISTEN connection beside them."""

    def __init__(
        self,
        *,
        model_url: str,
        api_url: str,
        database_url: str,
        tokens: int,
        pids: dict[str, int],
        timeout_s: float,
        keys: int = 1,
    ) -> None:
        self.keys = keys
        #: Each client's headers, in turn (the benchmark's admin key, then made ones).
        self.auth: list[dict[str, str]] = [AUTH]
        self.model_url = model_url
        self.api_url = api_url
        self.database_url = database_url
        self.tokens = tokens
        self.pids = pids
        self.timeout_s = timeout_s
        self.notifications = 0
        self.notification_bytes = 0
        self.story_input = {"prompt": PROMPT, "max_tokens": tokens}
        story = StoryInput.model_validate(self.story_input)
        # What the story pipeline sends (forgeline.backends.openai_compat).
        self.chat_body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": build_prompt(story)},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": story.max_tokens,
            "temperature": story.temperature,
        }

    async def run(self, counts: list[int], tokens_per_second: float) -> list[dict[str, Any]]:
        """Warm up (one stream each way, unmeasured), then both rounds for each count."""
        listener = await psycopg.AsyncConnection.connect(self.database_url, autocommit=True)
        await listener.execute(f"LISTEN {CHANNEL}")
        listening = asyncio.create_task(self._count_notifications(listener))
        try:
            await self._make_keys()
            print("warm-up     one direct stream and one story job (not measured)", flush=True)
            warm = await asyncio.gather(
                self._round(1, self._direct), self._round(1, self._through_forgeline)
            )
            for streams, _ in warm:
                failed = [s.error for s in streams if s.error]
                if failed:
                    raise RuntimeError(f"warm-up failed: {failed[0]}")
            rounds = []
            for count in counts:
                rounds.append(await self._measure(count, tokens_per_second))
                print_round(rounds[-1])
            return rounds
        finally:
            listening.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await listening
            await listener.close()

    async def _make_keys(self) -> None:
        """User keys for the clients beyond the first, made through the admin API."""
        async with httpx.AsyncClient(base_url=self.api_url, headers=AUTH, timeout=30.0) as admin:
            for number in range(1, self.keys):
                response = await admin.post("/api/v1/admin/keys", json={"name": f"bench-{number}"})
                response.raise_for_status()
                self.auth.append({"Authorization": f"Bearer {response.json()['key']}"})

    async def _count_notifications(self, connection: psycopg.AsyncConnection[Any]) -> None:
        async for notification in connection.notifies():
            self.notifications += 1
            self.notification_bytes += len(notification.payload)

    async def _measure(self, count: int, tokens_per_second: float) -> dict[str, Any]:
        await asyncio.sleep(SETTLE_S)
        direct, direct_cpu = await self._round(count, self._direct)
        await asyncio.sleep(SETTLE_S)
        notified, notified_bytes = self.notifications, self.notification_bytes
        through, through_cpu = await self._round(count, self._through_forgeline)
        await asyncio.sleep(NOTIFY_DRAIN_S)
        notifications = self.notifications - notified
        d, f = _figures(direct, self.tokens), _figures(through, self.tokens)
        f["ttft_breakdown_ms"] = await self._ttft_breakdown(through)
        span = f["span_s"]
        return {
            "clients": count,
            "nominal_tokens_per_s": round(count * tokens_per_second, 1),
            "direct": {**d, "cpu": direct_cpu},
            "forgeline": {
                **f,
                "cpu": through_cpu,
                "notifications": notifications,
                "notify_per_s": round(notifications / span, 1) if span else None,
                "notify_payload_bytes_mean": (
                    round((self.notification_bytes - notified_bytes) / notifications)
                    if notifications
                    else None
                ),
                "submit_ms": summary_ms([s.submit_s for s in through if s.submit_s is not None]),
            },
            "ratio": _ratio(f["tokens_per_s"], d["tokens_per_s"]),
            "added_ttft_ms": {
                q: _minus(f["ttft_ms"][q], d["ttft_ms"][q]) for q in ("p50", "p90", "p99")
            },
        }

    async def _ttft_breakdown(self, streams: list[Stream]) -> dict[str, dict[str, float]]:
        """Where forgeline's TTFT goes, from the database's timestamps (same clock).

        submit: client sends the POST -> the job's insert transaction starts;
        queue: -> the worker's attempt transaction starts;
        first_write: -> the transaction writing the first token event starts
        (includes the model's own TTFT and the emitter's batching wait);
        delivery: -> the client reads that token event (commit, NOTIFY, hub, SSE).
        """
        ids = [s.job_id for s in streams if s.job_id]
        async with await psycopg.AsyncConnection.connect(self.database_url) as db:
            rows = await (await db.execute(TIMELINE, (ids,))).fetchall()
        times = {row[0]: row[1:] for row in rows}
        parts: dict[str, list[float]] = {
            "submit": [],
            "queue": [],
            "first_write": [],
            "delivery": [],
        }
        for s in streams:
            created, started, first_write = times.get(s.job_id or "", (None, None, None))
            if None in (created, started, first_write) or s.wall_first_token is None:
                continue
            parts["submit"].append(created - s.wall_started)
            parts["queue"].append(started - created)
            parts["first_write"].append(first_write - started)
            parts["delivery"].append(s.wall_first_token - first_write)
        return {name: summary_ms(values) for name, values in parts.items() if values}

    async def _round(
        self, count: int, one: Callable[[httpx.AsyncClient], Awaitable[Stream]]
    ) -> tuple[list[Stream], dict[str, float | None]]:
        """``count`` clients at once, each with its own warmed keep-alive connection.

        One ``AsyncClient`` per client, as separate users would have: a single
        client's connection pool shared by hundreds of streams costs time that
        grows with their number (httpcore scans its pool on every request),
        which would show up as TTFT on both sides.
        """
        timeout = httpx.Timeout(self.timeout_s, connect=10.0)
        direct = one == self._direct
        base, probe = (self.model_url, "/models") if direct else (self.api_url, "/healthz")
        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(
                        base_url=base, timeout=timeout, headers=self.auth[i % len(self.auth)]
                    )
                )
                for i in range(count)
            ]
            # Open the connections first, so TCP set-up is not counted as TTFT.
            await asyncio.gather(*(client.get(probe) for client in clients))
            before = self._cpu()
            streams = await asyncio.wait_for(
                asyncio.gather(*(one(client) for client in clients)), self.timeout_s
            )
            after = self._cpu()
        elapsed = max((s.last_token or s.started) for s in streams) - min(
            s.started for s in streams
        )
        return list(streams), _cpu_shares(before, after, elapsed)

    async def _direct(self, client: httpx.AsyncClient) -> Stream:
        stream = Stream(started=time.perf_counter())
        try:
            async with client.stream("POST", "/chat/completions", json=self.chat_body) as response:
                if response.status_code != 200:
                    await response.aread()
                    stream.error = f"HTTP {response.status_code}: {response.text[:200]}"
                    return stream
                async for _, data in sse_messages(response):
                    if data == "[DONE]":
                        stream.status = "done"
                        break
                    for choice in json.loads(data).get("choices", ()):
                        _count_text(stream, choice["delta"].get("content"))
        except httpx.HTTPError as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
        return stream

    async def _through_forgeline(self, client: httpx.AsyncClient) -> Stream:
        stream = Stream(started=time.perf_counter(), wall_started=time.time())
        try:
            response = await client.post(
                "/api/v1/jobs", json={"pipeline": "story", "input": self.story_input}
            )
            stream.submit_s = time.perf_counter() - stream.started
            if response.status_code != 201:
                stream.error = f"submit: HTTP {response.status_code}: {response.text[:200]}"
                return stream
            job_id = stream.job_id = response.json()["id"]
            async with client.stream("GET", f"/api/v1/jobs/{job_id}/events") as events:
                if events.status_code != 200:
                    await events.aread()
                    stream.error = f"events: HTTP {events.status_code}: {events.text[:200]}"
                    return stream
                async for kind, data in sse_messages(events):
                    if kind == "token":
                        _count_text(stream, json.loads(data)["text"])
                        if stream.wall_first_token is None and stream.first_token is not None:
                            stream.wall_first_token = time.time()
                    elif kind == "attempt" and json.loads(data).get("attempt", 1) > 1:
                        stream.error = "the job was retried (tokens counted twice)"
                    elif kind == "final":
                        stream.status = json.loads(data)["status"]
                        break
                    elif kind == "reconnect":
                        stream.error = "the API asked the client to reconnect"
                        break
        except httpx.HTTPError as exc:
            stream.error = f"{type(exc).__name__}: {exc}"
        if stream.status not in (None, "succeeded") and stream.error is None:
            stream.error = f"job {stream.status}"
        return stream

    def _cpu(self) -> dict[str, float | None]:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        readings: dict[str, float | None] = {
            name: cpu_seconds(pid) for name, pid in self.pids.items()
        }
        readings["postgres"] = postgres_cpu_seconds()
        readings["clients"] = usage.ru_utime + usage.ru_stime
        # Time spent runnable but without a core: on a shared machine, the
        # difference between "this process had nothing to do" and "it was starved".
        for name, pid in [*self.pids.items(), ("clients", os.getpid())]:
            readings[f"{name}_wait"] = runqueue_seconds(pid)
        return readings


def runqueue_seconds(pid: int) -> float | None:
    """Seconds the threads of ``pid`` waited, runnable, for a core (Linux schedstat)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            total += int((task / "schedstat").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return total / 1e9


def _count_text(stream: Stream, text: str | None) -> None:
    """Count the pieces (words) in ``text``; the first one stamps the TTFT."""
    if not text:
        return
    now = time.perf_counter()
    pieces = len(text.split())
    if not pieces:
        return
    if stream.first_token is None:
        stream.first_token = now
    stream.last_token = now
    stream.tokens += pieces
    stream.text_events += 1


async def sse_messages(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """``(event, data)`` of each server-sent event; comments (pings) are skipped."""
    buffer = b""
    kind, data = "message", list[str]()
    async for chunk in response.aiter_bytes():
        buffer += chunk
        *lines, buffer = buffer.split(b"\n")
        for raw in lines:
            line = raw.rstrip(b"\r")
            if not line:
                if data:
                    yield kind, "\n".join(data)
                kind, data = "message", []
                continue
            if line.startswith(b":"):
                continue
            name, _, value = line.decode().partition(":")
            value = value.removeprefix(" ")
            if name == "event":
                kind = value
            elif name == "data":
                data.append(value)


# -- figures --------------------------------------------------------------------
def _figures(streams: list[Stream], tokens: int) -> dict[str, Any]:
    ttfts = [s.ttft_s for s in streams if s.ttft_s is not None]
    received = sum(s.tokens for s in streams)
    ends = [s.last_token for s in streams if s.last_token is not None]
    span = (max(ends) - min(s.started for s in streams)) if ends else 0.0
    # Each stream's own pace once it started: does it keep up with the model?
    paces = [
        (s.tokens - 1) / (s.last_token - s.first_token)
        for s in streams
        if s.first_token is not None and s.last_token is not None and s.last_token > s.first_token
    ]
    errors = [s.error for s in streams if s.error]
    return {
        "streams": len(streams),
        "complete": sum(1 for s in streams if s.tokens == tokens and not s.error),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": received,
        "span_s": round(span, 3),
        "tokens_per_s": round(received / span, 1) if span else 0.0,
        "stream_pace_tokens_per_s": {
            "p50": round(percentile(paces, 0.5), 1),
            "min": round(min(paces), 1) if paces else float("nan"),
        },
        "ttft_ms": summary_ms(ttfts),
        "text_events_per_stream": round(sum(s.text_events for s in streams) / len(streams), 1),
    }


def _cpu_shares(
    before: dict[str, float | None], after: dict[str, float | None], elapsed: float
) -> dict[str, float | None]:
    """CPU seconds used during the round, per process, as cores kept busy."""
    shares: dict[str, float | None] = {}
    for name, start in before.items():
        end = after.get(name)
        # PostgreSQL's total falls when other sessions' backends exit: no figure then.
        used = None if start is None or end is None else end - start
        shares[name] = (
            None if used is None or used < 0 or elapsed <= 0 else round(used / elapsed, 2)
        )
    return shares


def _ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def _minus(a: float, b: float) -> float:
    return round(a - b, 1)


def _loadavg(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) + " (1/5/15 min)"


def _mark(ok: bool) -> str:
    return "ok" if ok else "MISS"


def print_round(run: dict[str, Any]) -> None:
    """One round's figures as a few lines, as soon as it is done."""
    d, f = run["direct"], run["forgeline"]
    print(
        f"N={run['clients']:<4} direct    {d['tokens_per_s']:>8.1f} tok/s  TTFT p50 "
        f"{d['ttft_ms']['p50']:.1f} p99 {d['ttft_ms']['p99']:.1f} ms  "
        f"{d['complete']}/{d['streams']} complete  CPU {_cpu_text(d['cpu'])}"
    )
    print(
        f"       forgeline {f['tokens_per_s']:>8.1f} tok/s  TTFT p50 "
        f"{f['ttft_ms']['p50']:.1f} p99 {f['ttft_ms']['p99']:.1f} ms  "
        f"{f['complete']}/{f['streams']} complete  CPU {_cpu_text(f['cpu'])}"
    )
    pace = f["stream_pace_tokens_per_s"]
    print(
        f"       stream pace p50 {pace['p50']} min {pace['min']} tok/s "
        f"(direct p50 {d['stream_pace_tokens_per_s']['p50']}); "
        f"submit p50 {f['submit_ms']['p50']:.1f} ms; "
        f"{f['text_events_per_stream']:.1f} token events per job; "
        f"{f['notifications']} NOTIFYs ({f['notify_per_s']}/s, "
        f"{f['notify_payload_bytes_mean']} B mean)"
        + (f"; first error: {f['first_error']}" if f["first_error"] else "")
        + (f"; direct error: {d['first_error']}" if d["first_error"] else ""),
        flush=True,
    )
    parts = f.get("ttft_breakdown_ms") or {}
    if parts:
        print(
            "       TTFT p50/p99 by step: "
            + ", ".join(f"{k} {v['p50']:.1f}/{v['p99']:.1f}" for k, v in parts.items())
            + " ms",
            flush=True,
        )


def _cpu_text(cpu: dict[str, float | None]) -> str:
    busy = ", ".join(
        f"{k} {v:.2f}" for k, v in cpu.items() if v is not None and not k.endswith("_wait")
    )
    waiting = ", ".join(
        f"{k.removesuffix('_wait')} {v:.2f}"
        for k, v in cpu.items()
        if v is not None and k.endswith("_wait")
    )
    return f"busy {busy}; waiting for a core {waiting}"


def print_table(rounds: list[dict[str, Any]], tokens_per_second: float) -> None:
    """Every round in one table, with the targets beside the figures."""
    print(
        f"\n{'N':>4} {'nominal':>8} {'direct':>8} {'forgeline':>9} {'ratio':>6}  "
        f"{'TTFT direct p50/p99':>19} {'forgeline p50/p99':>19}  "
        f"{'added p50':>9} {'added p99':>9}  {'NOTIFY/s':>8}"
    )
    print(
        f"{'':>4} {'tok/s':>8} {'tok/s':>8} {'tok/s':>9} {'':>6}  {'ms':>19} {'ms':>19}  "
        f"{'ms':>9} {'ms':>9}"
    )
    for run in rounds:
        d, f, added = run["direct"], run["forgeline"], run["added_ttft_ms"]
        ratio = run["ratio"]
        print(
            f"{run['clients']:>4} {run['nominal_tokens_per_s']:>8.0f} {d['tokens_per_s']:>8.0f} "
            f"{f['tokens_per_s']:>9.0f} {ratio if ratio is not None else 'n/a':>6}  "
            f"{d['ttft_ms']['p50']:>9.1f}/{d['ttft_ms']['p99']:<9.1f} "
            f"{f['ttft_ms']['p50']:>9.1f}/{f['ttft_ms']['p99']:<9.1f}  "
            f"{added['p50']:>9.1f} {added['p99']:>9.1f}  {f['notify_per_s']:>8}"
        )
    print(
        f"\ntargets     ratio >= {TARGET_RATIO} at {TARGET_RATIO_AT} streams; added TTFT p50 <= "
        f"{TARGET_ADDED_P50_MS:g} ms, p99 <= {TARGET_ADDED_P99_MS:g} ms "
        "(LiteLLM's proxy: p50 2-12 ms, p99 13-43 ms)"
    )
    for run in rounds:
        added, ratio = run["added_ttft_ms"], run["ratio"]
        verdicts = [
            f"added p50 {_mark(added['p50'] <= TARGET_ADDED_P50_MS)}",
            f"added p99 {_mark(added['p99'] <= TARGET_ADDED_P99_MS)}",
        ]
        if run["clients"] == TARGET_RATIO_AT:
            verdicts.insert(0, f"ratio {_mark(ratio is not None and ratio >= TARGET_RATIO)}")
        print(f"  N={run['clients']:<4} " + ", ".join(verdicts))
    print(
        f"(nominal: N x {tokens_per_second:g} tokens/s; a reply's tokens over its span includes "
        "the time to the first token, so even a perfect round stays a little under it)"
    )


if __name__ == "__main__":
    main()
