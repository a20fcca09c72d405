"""Middleware overhead: ``GET /api/v1/jobs/{id}`` with every middleware on, against none.

Two servers on one fresh database, both up for the whole run, both at log
level ``--log-level`` and with uvicorn's own access log off:

full
    ``forgeline api``: the request id, time limit, security headers, access
    log and metrics middleware, JSON gzip, the error handlers, and the
    authentication dependency with its per-IP and per-key rate limits
    (thresholds lifted far above the load, so the limiter runs on every
    request and never refuses).
bare
    ``bench.bare_app``: one FastAPI route with the same body
    (``runtime.jobs.get`` then ``JobOut.from_job``) on a ``Runtime`` started
    from the same settings, and nothing else.

Both read the same ``echo`` job of the benchmark's admin key, submitted
through the full API first (no worker runs, so it stays queued and its
body never changes); the two bodies are compared before measuring. The load
comes from another process: ``wrk`` when it is installed (Debian: ``apt-get
install wrk``), else ``httpx.AsyncClient`` tasks in this process, with
``--connections`` keep-alive connections for ``--duration-s`` per round.
Rounds alternate, full then bare, ``--rounds`` times each, after an
unmeasured warm-up of each. Every response's status is counted: one that is
not 200 (a 401 or a 429 is quick to send) would flatter the full server.

Figures per variant: the median over its rounds of requests/s, and of each
round's p50 and p99 latency; non-200 responses; the server's CPU per
request and how long it waited for a core. The ratio full/bare comes from
the medians of the same run, and per pair of rounds; the target (ratio
>= 0.7) is printed beside it, never asserted. On a shared machine the CPU
per request moves less than the rates: its ratio bare/full is a second
estimate of the same thing.

    python -m bench.middleware_overhead                      # 3 rounds of 10 s each
    python -m bench.middleware_overhead --rounds 5 --connections 32 --json out.json
    python -m bench.middleware_overhead --client httpx       # without wrk
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.streaming import runqueue_seconds, wait_for_quiet
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
    workdir,
    write_json,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The spec's target: full requests/s at least this share of bare's.
TARGET_RATIO = 0.7
VARIANTS = ("full", "bare")
#: Above this share of a round spent waiting for a core, the rates say more about the machine.
CONTENDED_SHARE = 0.1
#: Sent by both clients to both servers, as a real client would.
HEADERS = {**AUTH, "Accept-Encoding": "gzip"}

#: wrk script: counts every status per thread, prints the figures as one JSON line.
WRK_SCRIPT = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) statuses = {} end
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  local counts = {}
  for _, thread in ipairs(threads) do
    for status, n in pairs(thread:get("statuses")) do
      counts[status] = (counts[status] or 0) + n
    end
  end
  local parts = {}
  for status, n in pairs(counts) do table.insert(parts, string.format('"%d": %d', status, n)) end
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "statuses": {%s}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}}\\n',
    summary.requests, summary.duration, table.concat(parts, ", "),
    e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency.mean, latency.max))
end
"""


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, start both servers, run the rounds, print and save."""
    parser = base_parser(__doc__.split("\n\n")[0])
    add_admin_url(parser)
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds per variant")
    parser.add_argument("--duration-s", type=float, default=10.0, help="length of one round")
    parser.add_argument(
        "--warmup-s", type=float, default=2.0, help="unmeasured load on each server first"
    )
    parser.add_argument(
        "--connections",
        type=int,
        default=8,
        help="keep-alive connections; above the database pool (10) the pool opens and closes "
        "connections, which slows the bare server more than the full one",
    )
    parser.add_argument(
        "--client",
        choices=["auto", "wrk", "httpx"],
        default="auto",
        help="load generator; auto: wrk when installed, else httpx",
    )
    parser.add_argument("--wrk-threads", type=int, default=1, help="wrk's threads (-t)")
    parser.add_argument(
        "--text-bytes", type=int, default=64, help="size of the echo job's input text"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="FORGELINE_LOG_LEVEL of both servers (info is what a deployment runs)",
    )
    parser.add_argument(
        "--max-load", type=float, default=1.5, help="start once the 1-minute load is below this"
    )
    parser.add_argument(
        "--load-wait-s", type=float, default=0.0, help="longest wait for that; 0: do not wait"
    )
    parser.add_argument("--keep", action="store_true", help="keep the servers' log files")
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.duration_s <= 0 or args.connections < 1:
        parser.error("--rounds, --duration-s and --connections must be positive")
    wrk = shutil.which("wrk")
    if args.client == "wrk" and wrk is None:
        parser.error("--client wrk: wrk is not installed (Debian: apt-get install wrk)")
    client = "wrk" if args.client == "wrk" or (args.client == "auto" and wrk) else "httpx"

    info = machine_info(args.admin_url)
    info["pythonpath"] = os.environ.get("PYTHONPATH")
    print("forgeline middleware overhead: GET /api/v1/jobs/{id}, full app versus bare handler")
    print_machine(info)
    if info["pythonpath"]:
        print(f"PYTHONPATH  {info['pythonpath']} (forgeline imported from there, not the checkout)")
    client_text = f"wrk ({wrk}, {args.wrk_threads} thread)" if client == "wrk" else "httpx"
    print(
        f"load        {client_text}, {args.connections} keep-alive connections, "
        f"{args.rounds} x {args.duration_s:g} s per variant, alternating, after "
        f"{args.warmup_s:g} s warm-up each; log level {args.log_level}"
    )
    waited = wait_for_quiet(args.max_load, args.load_wait_s)
    load_start = os.getloadavg()
    print(
        f"load avg    {_loadavg(load_start)} at start (waited {waited:.0f} s; "
        "other work shares the cores)\n"
    )

    started = time.monotonic()
    with scratch_databases(args.admin_url) as databases, workdir("fl-bench-", args.keep) as root:
        database_url = databases.create()
        run = Run(args=args, client=client, root=root, database_url=database_url)
        rounds, checks = run.all_rounds()
    load_end = os.getloadavg()
    wall = time.monotonic() - started

    figures = summarize(rounds, args.duration_s)
    report(figures, checks)
    print(f"\nload avg    {_loadavg(load_start)} at start, {_loadavg(load_end)} at end")
    print(f"wall time   {wall:.0f} s (servers, warm-up and every round)")
    write_json(
        args.json,
        {
            "benchmark": "middleware_overhead",
            "machine": info,
            "client": client,
            "connections": args.connections,
            "wrk_threads": args.wrk_threads if client == "wrk" else None,
            "rounds_per_variant": args.rounds,
            "duration_s": args.duration_s,
            "warmup_s": args.warmup_s,
            "text_bytes": args.text_bytes,
            "log_level": args.log_level,
            "load_average": {"start": list(load_start), "end": list(load_end)},
            "wall_s": round(wall, 1),
            "target_ratio_min": TARGET_RATIO,
            "checks": checks,
            **figures,
            "rounds": rounds,
        },
    )


# -- servers ----------------------------------------------------------------------
class BareServer(Forgeline):
    """``python -m bench.bare_app``, run like the ``forgeline`` subprocesses."""

    def start(self) -> BareServer:
        """Launch the bare app from this checkout's ``bench`` package."""
        env = dict(self.env)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
        with self.log_path.open("ab") as log:
            self.started_at = time.monotonic()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "bench.bare_app"],
                env=env,
                cwd=self.workdir,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def wait_ok(self, path: str, timeout_s: float = 60.0, poll_s: float = 0.05) -> float:
        """Poll ``path`` until 200 (it has no ``/readyz``); seconds since launch."""
        if self.process is None:
            raise RuntimeError("not started")
        deadline = self.started_at + timeout_s
        with httpx.Client(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"bare app exited with {self.process.returncode}:\n" + self.output()[-3000:]
                    )
                try:
                    if client.get(f"{self.url}{path}").status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.HTTPError:
                    pass
                time.sleep(poll_s)
        raise RuntimeError(f"bare app not answering after {timeout_s} s:\n{self.output()[-3000:]}")


@dataclass
class Run:
    """Both servers on one database, and the rounds against them."""

    args: Any
    client: str
    root: Path
    database_url: str

    def all_rounds(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Start both servers, check they answer alike, warm up, run every round."""
        settings: dict[str, object] = {
            "database_url": self.database_url,
            "auto_migrate": "false",
            "data_dir": self.root / "data",
            "storage_url": (self.root / "artifacts").as_uri(),
            "log_level": self.args.log_level,
        }
        full_port, bare_port = free_port(), free_port()
        full = Forgeline(
            ["api"], forgeline_env(**settings, port=full_port), self.root, port=full_port
        )
        bare = BareServer(
            ["bare"], forgeline_env(**settings, port=bare_port), self.root, port=bare_port
        )
        try:
            full.start()
            full_ready_s = full.wait_ready()
            # The full API registers the admin key; the job is that key's.
            path = self._submit_job(full.url)
            bare.start()
            bare_ready_s = bare.wait_ok(path)
            checks = self._compare(full.url, bare.url, path)
            checks.update(full_ready_s=round(full_ready_s, 2), bare_ready_s=round(bare_ready_s, 2))
            servers = {"full": full, "bare": bare}
            for name in VARIANTS:
                self._load(servers[name].url + path, self.args.warmup_s)
            rounds: list[dict[str, Any]] = []
            for index in range(self.args.rounds):
                for name in VARIANTS:
                    figures = self._round(servers[name], path)
                    figures.update(variant=name, round=index + 1)
                    rounds.append(figures)
                    print_round(figures)
            return rounds, checks
        finally:
            bare.stop()
            full.stop()

    def _submit_job(self, url: str) -> str:
        body = {"pipeline": "echo", "input": {"text": "x" * self.args.text_bytes}}
        response = httpx.post(f"{url}/api/v1/jobs", json=body, headers=AUTH, timeout=30.0)
        if response.status_code != 201:
            raise RuntimeError(f"submitting the job: {response.status_code} {response.text}")
        return f"/api/v1/jobs/{response.json()['id']}"

    @staticmethod
    def _compare(full_url: str, bare_url: str, path: str) -> dict[str, Any]:
        """Both servers answer 200 with the same JSON; what the full one adds."""
        with httpx.Client(timeout=10.0, headers=HEADERS) as client:
            full = client.get(full_url + path)
            bare = client.get(bare_url + path)
        if full.status_code != 200 or bare.status_code != 200:
            raise RuntimeError(f"expected 200 from both, got {full.status_code}/{bare.status_code}")
        if full.json() != bare.json():
            raise RuntimeError(f"the bodies differ:\nfull {full.text}\nbare {bare.text}")
        return {
            "same_body": True,
            "body_bytes": len(full.content),
            "full_content_encoding": full.headers.get("content-encoding"),
            "full_headers_added": sorted(set(full.headers) - set(bare.headers)),
        }

    def _round(self, server: Forgeline, path: str) -> dict[str, Any]:
        before = self._cpu(server.pid)
        figures = self._load(server.url + path, self.args.duration_s)
        after = self._cpu(server.pid)
        requests = figures["requests"]
        for name in ("server", "postgres", "client"):
            used = _minus(after[name], before[name])
            figures[f"{name}_cpu_ms_per_request"] = (
                None if used is None or not requests else round(used * 1000 / requests, 3)
            )
            busy = None if used is None else round(used / figures["elapsed_s"], 2)
            figures[f"{name}_busy"] = busy
        waited = _minus(after["server_wait"], before["server_wait"])
        figures["server_wait_s"] = None if waited is None else round(waited, 2)
        # Less the reading of ours. A pool over its size opens and closes
        # connections (their backends' CPU leaves the postgres figure).
        figures["new_db_sessions"] = int(after["sessions"] or 0) - int(before["sessions"] or 0) - 1
        return figures

    def _cpu(self, pid: int) -> dict[str, float | None]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        # wrk is the only child that exits while the servers run.
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        clients = own if self.client == "httpx" else children
        return {
            "server": cpu_seconds(pid),
            "server_wait": runqueue_seconds(pid),
            "postgres": postgres_cpu_seconds(),
            "client": clients.ru_utime + clients.ru_stime,
            "sessions": _sessions(self.database_url),
        }

    def _load(self, url: str, duration_s: float) -> dict[str, Any]:
        if duration_s <= 0:
            return {}
        if self.client == "wrk":
            return self._wrk(url, duration_s)
        return asyncio.run(httpx_load(url, self.args.connections, duration_s))

    def _wrk(self, url: str, duration_s: float) -> dict[str, Any]:
        script = self.root / "count-statuses.lua"
        script.write_text(WRK_SCRIPT)
        headers = [arg for name, value in HEADERS.items() for arg in ("-H", f"{name}: {value}")]
        command = [
            "wrk",
            f"-t{min(self.args.wrk_threads, self.args.connections)}",
            f"-c{self.args.connections}",
            f"-d{max(1, round(duration_s))}s",
            "--timeout",
            "10s",
            "-s",
            str(script),
            *headers,
            url,
        ]
        done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("WRK_JSON ")), None)
        if done.returncode != 0 or line is None:
            raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
        raw = json.loads(line.removeprefix("WRK_JSON "))
        elapsed = raw["duration_us"] / 1e6
        statuses = {str(k): v for k, v in sorted(raw["statuses"].items())}
        errors = sum(raw["errors"].values())
        if errors:
            statuses["0"] = statuses.get("0", 0) + errors  # no answer at all
        answered = raw["requests"]
        return {
            "elapsed_s": round(elapsed, 3),
            "requests": answered,
            "requests_per_s": round(answered / elapsed, 1),
            "statuses": statuses,
            "non_200": sum(n for code, n in statuses.items() if code != "200"),
            "latency_ms": {k: round(v / 1000, 2) for k, v in raw["latency_us"].items()},
        }


async def httpx_load(url: str, connections: int, duration_s: float) -> dict[str, Any]:
    """``connections`` tasks each sending one request after another for ``duration_s``."""
    latencies: list[float] = []
    statuses: Counter[int] = Counter()
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=10.0, headers=HEADERS) as client:
        started = time.perf_counter()
        deadline = started + duration_s

        async def one_connection() -> None:
            while time.perf_counter() < deadline:
                sent = time.perf_counter()
                try:
                    response = await client.get(url)
                    statuses[response.status_code] += 1
                except httpx.HTTPError:
                    statuses[0] += 1  # no answer at all
                latencies.append(time.perf_counter() - sent)

        await asyncio.gather(*(one_connection() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    ms = [s * 1000 for s in latencies]
    return {
        "elapsed_s": round(elapsed, 3),
        "requests": len(latencies),
        "requests_per_s": round(len(latencies) / elapsed, 1),
        "statuses": {str(code): n for code, n in sorted(statuses.items())},
        "non_200": sum(n for code, n in statuses.items() if code != 200),
        "latency_ms": {
            "p50": round(percentile(ms, 0.50), 2),
            "p90": round(percentile(ms, 0.90), 2),
            "p99": round(percentile(ms, 0.99), 2),
            "mean": round(statistics.fmean(ms), 2) if ms else float("nan"),
            "max": round(max(ms), 2) if ms else float("nan"),
        },
    }


# -- figures ----------------------------------------------------------------------
def summarize(rounds: list[dict[str, Any]], duration_s: float) -> dict[str, Any]:
    """Medians per variant, the ratio full/bare, and the ratio of each pair of rounds."""
    variants: dict[str, dict[str, Any]] = {}
    for name in VARIANTS:
        mine = [r for r in rounds if r["variant"] == name]
        variants[name] = {
            "requests_per_s": _median([r["requests_per_s"] for r in mine]),
            "requests_per_s_rounds": [r["requests_per_s"] for r in mine],
            "latency_p50_ms": _median([r["latency_ms"]["p50"] for r in mine]),
            "latency_p99_ms": _median([r["latency_ms"]["p99"] for r in mine]),
            "requests": sum(r["requests"] for r in mine),
            "non_200": sum(r["non_200"] for r in mine),
            "server_cpu_ms_per_request": _median([r["server_cpu_ms_per_request"] for r in mine]),
            "server_wait_s": _median([r["server_wait_s"] for r in mine]),
            "new_db_sessions": sum(r["new_db_sessions"] for r in mine),
        }
    full, bare = variants["full"], variants["bare"]
    ratio = _ratio(full["requests_per_s"], bare["requests_per_s"])
    pairs = [
        _ratio(f["requests_per_s"], b["requests_per_s"])
        for f, b in zip(
            [r for r in rounds if r["variant"] == "full"],
            [r for r in rounds if r["variant"] == "bare"],
            strict=True,
        )
    ]
    cpu_ratio = _ratio(bare["server_cpu_ms_per_request"], full["server_cpu_ms_per_request"])
    clean = full["non_200"] == 0 and bare["non_200"] == 0
    waits = [r["server_wait_s"] for r in rounds if r["server_wait_s"] is not None]
    return {
        # Share of a round the measured server spent runnable without a core.
        "server_wait_share_max": round(max(waits) / duration_s, 2) if waits else None,
        "variants": variants,
        "ratio_full_over_bare": ratio,
        "ratio_per_pair": pairs,
        "cpu_ratio_bare_over_full": cpu_ratio,
        "all_200": clean,
        "target_met": bool(clean and ratio is not None and ratio >= TARGET_RATIO),
    }


def print_round(r: dict[str, Any]) -> None:
    """One round's figures, as soon as it is done."""
    lat = r["latency_ms"]
    print(
        f"round {r['round']} {r['variant']:<4} {r['requests_per_s']:>8.1f} req/s  "
        f"p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms  "
        f"statuses {r['statuses']}  "
        f"server CPU {_fmt(r['server_cpu_ms_per_request'])} ms/req "
        f"(busy {_fmt(r['server_busy'])}, waited {_fmt(r['server_wait_s'])} s for a core), "
        f"postgres (all local) {_fmt(r['postgres_cpu_ms_per_request'])} ms/req, "
        f"client {_fmt(r['client_cpu_ms_per_request'])} ms/req, "
        f"{r['new_db_sessions']} new db sessions",
        flush=True,
    )


def report(figures: dict[str, Any], checks: dict[str, Any]) -> None:
    """The medians, the ratio and the target."""
    print(f"\n{'variant':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-200':>8} "
          f"{'CPU ms/req':>10}  rounds req/s")  # fmt: skip
    for name, v in figures["variants"].items():
        print(
            f"{name:<8} {v['requests_per_s']:>9.1f} {v['latency_p50_ms']:>8.2f} "
            f"{v['latency_p99_ms']:>8.2f} {v['non_200']:>8} "
            f"{_fmt(v['server_cpu_ms_per_request']):>10}  "
            + ", ".join(f"{x:.0f}" for x in v["requests_per_s_rounds"])
        )
    ratio = figures["ratio_full_over_bare"]
    verdict = "met" if figures["target_met"] else "MISSED"
    if not figures["all_200"]:
        verdict += " (responses other than 200: the figures do not count)"
    print(
        f"\nratio       full/bare {_fmt(ratio)} (target >= {TARGET_RATIO:g}: {verdict}); "
        f"per pair of rounds {', '.join(_fmt(p) for p in figures['ratio_per_pair'])}"
    )
    print(
        "db sessions opened during the rounds: "
        + ", ".join(f"{n} {v['new_db_sessions']}" for n, v in figures["variants"].items())
        + " (beyond the pool's size, connections open and close per request)"
    )
    contended = figures["server_wait_share_max"]
    if contended is not None and contended > CONTENDED_SHARE:
        print(
            f"contention  a server waited for a core up to {contended:.0%} of a round: the "
            "rates are those of a shared machine; the CPU ratio below is the steadier estimate"
        )
    print(
        f"CPU ratio   bare/full server CPU per request {_fmt(figures['cpu_ratio_bare_over_full'])} "
        "(moves less with other load than the rates)"
    )
    print(
        f"checks      same body from both ({checks['body_bytes']} bytes, full's "
        f"content-encoding {checks['full_content_encoding'] or 'none'}); full adds headers "
        f"{', '.join(checks['full_headers_added'])}; ready in full {checks['full_ready_s']:.2f} s, "
        f"bare {checks['bare_ready_s']:.2f} s"
    )


def _sessions(url: str) -> int:
    """Sessions ever opened on the database (PostgreSQL 14+ counts them)."""
    with psycopg.connect(url, autocommit=True) as db:
        row = db.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return round(statistics.median(known), 3) if known else None


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _minus(after: float | None, before: float | None) -> float | None:
    return None if after is None or before is None else after - before


def _loadavg(values: tuple[float, float, float]) -> str:
    return " / ".join(f"{v:.2f}" for v in values) + " (1/5/15 min)"


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


if __name__ == "__main__":
    main()
