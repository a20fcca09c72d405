"""Latency of ``POST /api/v1/jobs`` under concurrent clients.

Starts ``forgeline api`` as a subprocess on a fresh database (no worker runs,
so the queue only grows), sends a fixed number of ``echo`` submissions from
many concurrent clients over keep-alive connections, and reports the latency
percentiles seen by the clients and the requests per second. A short warm-up
(not counted) fills the connection pools first.

The load generator runs on the same machine, so its own CPU is reported too:
on a small machine it competes with the API and PostgreSQL for the cores.

    python -m bench.submit_latency                          # 2000 requests, 50 clients
    python -m bench.submit_latency --clients 10 --requests 5000 --json out.json
"""

from __future__ import annotations

import asyncio
import resource
import time
from collections import Counter
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
    postgres_cpu_seconds,
    print_machine,
    scratch_databases,
    summary_ms,
    workdir,
    write_json,
)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the load, print and save the figures."""
    parser = base_parser(__doc__.split("\n\n")[0])
    add_admin_url(parser)
    parser.add_argument("--requests", type=int, default=2000, help="submissions measured")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument(
        "--warmup", type=int, default=200, help="submissions sent first, unmeasured"
    )
    parser.add_argument(
        "--text-bytes", type=int, default=64, help="size of the echo job's input text"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="FORGELINE_LOG_LEVEL of the API process",
    )
    parser.add_argument("--keep", action="store_true", help="keep the API's log file")
    args = parser.parse_args(argv)

    info = machine_info(args.admin_url)
    print("forgeline submit latency: POST /api/v1/jobs (echo), API only, no worker")
    print_machine(info)
    print(
        f"load avg    {info['load_average_1m']} (1 minute, at start; other work shares the cores)"
    )
    print(
        f"requests    {args.requests} requests from {args.clients} concurrent clients "
        f"after {args.warmup} warm-up; API log level {args.log_level}\n"
    )

    with scratch_databases(args.admin_url) as databases, workdir("fl-bench-", args.keep) as root:
        url = databases.create()
        port = free_port()
        api = Forgeline(
            ["api"],
            forgeline_env(
                database_url=url,
                auto_migrate="false",
                data_dir=root / "data",
                storage_url=(root / "artifacts").as_uri(),
                log_level=args.log_level,
                port=port,
            ),
            root,
            port=port,
        )
        api.start()
        try:
            ready_s = api.wait_ready()
            figures = asyncio.run(
                load(api, url, args.requests, args.clients, args.warmup, "x" * args.text_bytes)
            )
        finally:
            api.stop()
        with psycopg.connect(url, autocommit=True) as db:
            row = db.execute("SELECT count(*) FROM jobs").fetchone()
            stored = int(row[0]) if row else 0

    figures.update(
        api_ready_s=round(ready_s, 2),
        jobs_stored=stored,
        jobs_expected=args.requests + args.warmup,
    )
    report(figures)
    write_json(
        args.json,
        {
            "benchmark": "submit_latency",
            "machine": info,
            "requests": args.requests,
            "clients": args.clients,
            "warmup": args.warmup,
            "text_bytes": args.text_bytes,
            "log_level": args.log_level,
            **figures,
        },
    )


async def load(
    api: Forgeline, url: str, requests: int, clients: int, warmup: int, text: str
) -> dict[str, Any]:
    """Send ``warmup`` then ``requests`` submissions from ``clients`` tasks."""
    body = {"pipeline": "echo", "input": {"text": text}}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(
        base_url=api.url, limits=limits, timeout=30.0, headers=AUTH
    ) as client:
        await _run(client, body, warmup, clients)
        sessions_before = _sessions(url)
        api_cpu_before = cpu_seconds(api.pid)
        pg_cpu_before = postgres_cpu_seconds()
        own_before = _own_cpu_seconds()
        started = time.perf_counter()
        latencies, statuses = await _run(client, body, requests, clients)
        elapsed = time.perf_counter() - started
        own_cpu = _own_cpu_seconds() - own_before
        api_cpu_after = cpu_seconds(api.pid)
        pg_cpu_after = postgres_cpu_seconds()
    # Includes the two statistics reads of ours.
    new_sessions = _sessions(url) - sessions_before - 1
    ok = statuses.get(201, 0)
    api_cpu = (
        None if api_cpu_before is None or api_cpu_after is None else api_cpu_after - api_cpu_before
    )
    pg_cpu = None if pg_cpu_before is None or pg_cpu_after is None else pg_cpu_after - pg_cpu_before
    return {
        "elapsed_s": round(elapsed, 3),
        "requests_per_s": round(requests / elapsed, 1),
        "created_201": ok,
        "statuses": {str(code): count for code, count in sorted(statuses.items())},
        "latency_ms": summary_ms(latencies),
        "api_cpu_ms_per_request": _per(api_cpu, requests),
        "api_cpu_share": None if api_cpu is None else round(api_cpu / elapsed, 2),
        "postgres_cpu_ms_per_request": _per(pg_cpu, requests),
        "client_cpu_ms_per_request": _per(own_cpu, requests),
        "new_db_sessions": new_sessions,
    }


async def _run(
    client: httpx.AsyncClient, body: dict[str, Any], requests: int, clients: int
) -> tuple[list[float], Counter[int]]:
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    remaining = iter(range(requests))

    async def one_client() -> None:
        for _ in remaining:
            started = time.perf_counter()
            try:
                response = await client.post("/api/v1/jobs", json=body)
                statuses[response.status_code] += 1
            except httpx.HTTPError:
                statuses[0] += 1  # no answer at all
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return latencies, statuses


def report(figures: dict[str, Any]) -> None:
    """The figures as a few lines."""
    lat = figures["latency_ms"]
    print(
        f"latency     p50 {lat['p50']:.1f} ms, p90 {lat['p90']:.1f} ms, p99 {lat['p99']:.1f} ms, "
        f"mean {lat['mean']:.1f} ms, max {lat['max']:.1f} ms"
    )
    print(
        f"throughput  {figures['requests_per_s']:.0f} requests/s "
        f"({figures['created_201']} created in {figures['elapsed_s']:.2f} s; "
        f"statuses {figures['statuses']})"
    )
    print(
        f"CPU/request API {_fmt(figures['api_cpu_ms_per_request'])} ms "
        f"(busy {_fmt(figures['api_cpu_share'])} of a core), "
        f"postgres {_fmt(figures['postgres_cpu_ms_per_request'])} ms, "
        f"load generator {_fmt(figures['client_cpu_ms_per_request'])} ms"
    )
    print(
        f"connections {figures['new_db_sessions']} new database sessions opened during the run "
        "(a backend's CPU leaves the count above when it exits)"
    )
    print(
        f"checks      API ready in {figures['api_ready_s']:.2f} s; "
        f"{figures['jobs_stored']} jobs stored of {figures['jobs_expected']} sent"
    )


def _sessions(url: str) -> int:
    """Sessions ever opened on the database (PostgreSQL 14+ counts them)."""
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _per(seconds: float | None, count: int) -> float | None:
    return None if seconds is None or not count else round(seconds * 1000 / count, 2)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
