"""Time from launching ``forgeline serve`` to ``/readyz`` answering 200.

The embedded default: no database URL, ``FORGELINE_DATA_DIR`` a fresh
temporary folder. The first start runs initdb and the migrations; the later
starts reuse the folder (the embedded PostgreSQL is stopped between starts,
as it is when the last forgeline process exits, so each start starts it).

A breakdown follows, so a slow start says where its time goes: interpreter
start, imports (with the heaviest packages from ``-X importtime``), the
embedded PostgreSQL, the migrations check, the rest of the runtime, and the
readiness checks, each timed in a fresh process.

    python -m bench.startup                   # first start, then 5 reuse starts
    python -m bench.startup --repeats 10 --json out.json
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.startup_probe import SERVE_MODULES
from bench.support import (
    Forgeline,
    base_parser,
    forgeline_env,
    free_port,
    machine_info,
    print_machine,
    workdir,
    write_json,
)

#: Longest wait for the embedded PostgreSQL to stop after forgeline exits.
PG_STOP_TIMEOUT_S = 20.0


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, time the starts and the breakdown, print and save."""
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="starts on the reused data dir")
    parser.add_argument("--timeout-s", type=float, default=90.0, help="longest wait for one start")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the per-phase timings")
    parser.add_argument("--keep", action="store_true", help="keep the data dir and logs")
    args = parser.parse_args(argv)

    info = machine_info()
    info["embedded_postgresql"] = _embedded_postgres_version()
    print("forgeline start-up: `forgeline serve`, embedded database, launch to /readyz 200")
    print_machine(info)
    print(
        f"load avg    {info['load_average_1m']} (1 minute, at start; other work shares the cores)"
    )
    print(f"embedded    PostgreSQL {info['embedded_postgresql']} (pgserver)\n")

    with workdir("fl-bench-start-", args.keep) as root:
        data_dir = root / "data"
        first = start_once(root, data_dir, args.timeout_s)
        _print_start("first start (initdb + migrations)", first)
        reuse = []
        for index in range(args.repeats):
            run = start_once(root, data_dir, args.timeout_s)
            reuse.append(run)
            _print_start(f"reuse start {index + 1}", run)
        median = statistics.median(r["ready_s"] for r in reuse) if reuse else float("nan")
        print(f"\nreuse start: median {median:.2f} s to ready over {len(reuse)} starts")
        breakdown = None if args.no_breakdown else measure_breakdown(root, data_dir)
    if breakdown is not None:
        _print_breakdown(breakdown)
    write_json(
        args.json,
        {
            "benchmark": "startup",
            "machine": info,
            "first_start": first,
            "reuse_starts": reuse,
            "reuse_median_ready_s": round(median, 3),
            "breakdown": breakdown,
        },
    )


def start_once(root: Path, data_dir: Path, timeout_s: float) -> dict[str, Any]:
    """Launch ``forgeline serve``, wait for /readyz 200, stop it; the timings."""
    port = free_port()
    serve = Forgeline(
        ["serve", "--port", str(port)],
        forgeline_env(data_dir=data_dir),
        root,
        port=port,
    )
    serve.start()
    try:
        ready_s = serve.wait_ready(timeout_s)
    finally:
        stop_started = time.monotonic()
        code = serve.stop()
        stop_s = time.monotonic() - stop_started
    pg_stop_s = _wait_embedded_stopped(data_dir)
    return {
        "ready_s": round(ready_s, 3),
        "stop_s": round(stop_s, 3),
        "exit_code": code,
        "embedded_pg_stopped_after_s": None if pg_stop_s is None else round(pg_stop_s, 3),
    }


def measure_breakdown(root: Path, data_dir: Path) -> dict[str, Any]:
    """Each phase of a reuse start, timed in fresh processes."""
    env = forgeline_env(data_dir=data_dir)
    python_s = _wall([sys.executable, "-c", "pass"], env, root)
    help_s = _wall([sys.executable, "-m", "forgeline", "--help"], env, root)
    imports = _import_times(env, root)
    return {
        "python_startup_s": round(python_s, 3),
        "forgeline_help_s": round(help_s, 3),
        "imports": imports,
        "first_start_phases_s": _probe(root / "probe-data", env, root),
        "reuse_start_phases_s": _probe(data_dir, env, root),
    }


def _probe(data_dir: Path, env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Run ``bench.startup_probe`` on ``data_dir`` in a fresh process; its timings."""
    probe = subprocess.run(
        [sys.executable, "-m", "bench.startup_probe", str(data_dir)],
        env={**env, "PYTHONPATH": _pythonpath(env)},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if probe.returncode != 0:
        raise RuntimeError(f"the phase probe failed:\n{probe.stderr[-3000:]}")
    _wait_embedded_stopped(data_dir)
    phases: dict[str, float] = json.loads(probe.stdout.strip().splitlines()[-1])
    return phases


def _import_times(env: dict[str, str], cwd: Path, top: int = 12) -> dict[str, Any]:
    """``-X importtime`` of the serve modules, as seconds per distribution.

    Each module's own (self) time goes to its top-level package, so the
    figures add up and name what is heavy (``sqlalchemy``, ``openai``), not
    just ``forgeline`` whose imports pull everything in. The interpreter's
    own start-up imports (``site``, ``encodings``) are left out.
    """
    own = _import_log("pass", env, cwd)
    packages = _import_log("; ".join(f"import {name}" for name in SERVE_MODULES), env, cwd)
    for name, us in own.items():
        packages[name] = packages.get(name, 0) - us
    heaviest = sorted(packages.items(), key=lambda item: item[1], reverse=True)[:top]
    return {
        "total_s": round(sum(packages.values()) / 1e6, 3),
        "heaviest_s": {name: round(us / 1e6, 3) for name, us in heaviest},
    }


def _import_log(statement: str, env: dict[str, str], cwd: Path) -> dict[str, int]:
    """Microseconds of import work per top-level package while running ``statement``."""
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    packages: dict[str, int] = {}
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line.removeprefix("import time:").split("|", 2)
        if not own.strip().isdigit():
            continue  # the header line
        root_name = name.strip().split(".")[0]
        packages[root_name] = packages.get(root_name, 0) + int(own)
    return packages


def _wall(command: list[str], env: dict[str, str], cwd: Path, runs: int = 3) -> float:
    """The fastest of ``runs`` wall-clock times of ``command``."""
    best = float("inf")
    for _ in range(runs):
        begun = time.perf_counter()
        subprocess.run(command, env=env, cwd=cwd, capture_output=True, timeout=120, check=False)
        best = min(best, time.perf_counter() - begun)
    return best


def _wait_embedded_stopped(data_dir: Path) -> float | None:
    """Seconds until the embedded server's pid file is gone; None past the bound."""
    pid_file = data_dir / "postgres" / "postmaster.pid"
    begun = time.monotonic()
    while pid_file.exists():
        if time.monotonic() - begun > PG_STOP_TIMEOUT_S:
            return None
        time.sleep(0.02)
    return time.monotonic() - begun


def _embedded_postgres_version() -> str:
    """The version of the PostgreSQL the pgserver wheel ships (without importing it)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or spec.origin is None:
        return "pgserver not installed"
    postgres = Path(spec.origin).parent / "pginstall" / "bin" / "postgres"
    try:
        version = subprocess.run(
            [str(postgres), "--version"], capture_output=True, text=True, timeout=30, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return version.stdout.strip().rpartition(" ")[2]


def _pythonpath(env: dict[str, str]) -> str:
    """PYTHONPATH that lets a child find ``bench`` (the repository root first)."""
    root = str(Path(__file__).resolve().parents[1])
    existing = env.get("PYTHONPATH")
    return f"{root}:{existing}" if existing else root


def _secs(value: float | None) -> str:
    return "        -  " if value is None else f"{value:9.3f} s"


def _print_start(label: str, run: dict[str, Any]) -> None:
    stopped = run["embedded_pg_stopped_after_s"]
    print(
        f"{label:<36} ready in {run['ready_s']:6.2f} s; stop took {run['stop_s']:.2f} s"
        + ("" if stopped is None else f", embedded PostgreSQL gone {stopped:.2f} s later")
    )


def _print_breakdown(breakdown: dict[str, Any]) -> None:
    print("\nwhere a reuse start goes (each in a fresh process):")
    print(f"  python interpreter start         {breakdown['python_startup_s']:6.3f} s")
    print(f"  `forgeline --help`                {breakdown['forgeline_help_s']:6.3f} s")
    imports = breakdown["imports"]
    print(
        f"  import {', '.join(SERVE_MODULES)}: {imports['total_s']:.3f} s "
        "(-X importtime; heaviest packages, own time)"
    )
    for name, seconds in imports["heaviest_s"].items():
        print(f"      {name:<28} {seconds:6.3f} s")
    print("  steps of a start, in-process:        first start   reuse start")
    first = breakdown["first_start_phases_s"]
    reuse = breakdown["reuse_start_phases_s"]
    for name in dict.fromkeys([*first, *reuse]):
        print(f"      {name:<28} {_secs(first.get(name))}   {_secs(reuse.get(name))}")


if __name__ == "__main__":
    main()
