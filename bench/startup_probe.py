"""One start of forgeline's runtime, timed step by step (a helper of ``bench.startup``).

Runs in a fresh process and imports nothing heavy before it starts timing,
so the import figure is what ``forgeline serve`` pays. Prints the timings as
one JSON line. The embedded PostgreSQL in DATA_DIR must not be running.

    python -m bench.startup_probe DATA_DIR
"""

from __future__ import annotations

import argparse
import asyncio
import inspect
import json
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

#: Modules ``forgeline serve`` imports before it can start anything.
SERVE_MODULES = ("forgeline.cli", "forgeline.runtime", "forgeline.api.app")


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run the probe, print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path, help="FORGELINE_DATA_DIR of the start")
    args = parser.parse_args(argv)
    print(json.dumps(asyncio.run(probe(args.data_dir))))


async def probe(data_dir: Path) -> dict[str, float]:
    """Start a runtime the way ``serve`` does, timing each step it takes.

    The steps are the module-level functions :meth:`Runtime.start` calls,
    wrapped in place, so the probe follows the code rather than copying it.
    """
    timings: dict[str, float] = {}
    started = time.perf_counter()
    for name in SERVE_MODULES:
        __import__(name)
    timings["import_serve_modules"] = time.perf_counter() - started

    import forgeline.runtime as runtime_module
    from forgeline.api.app import create_app
    from forgeline.health import run_checks
    from forgeline.settings import get_settings

    for name, label in (
        ("load_pipelines", "load_pipelines"),
        ("resolve_database", "embedded_postgres_start"),
        ("create_queue_app", "create_queue_app"),
    ):
        _wrap(runtime_module, name, label, timings)
    _wrap(runtime_module.migrate, "upgrade", "migrations_upgrade", timings)

    settings = get_settings(_env_file=None, data_dir=data_dir)
    begun = time.perf_counter()
    runtime = await runtime_module.Runtime.start(settings)
    timings["runtime_start_total"] = time.perf_counter() - begun
    try:
        begun = time.perf_counter()
        create_app(settings, with_worker=True, runtime=runtime)
        timings["create_app"] = time.perf_counter() - begun
        begun = time.perf_counter()
        results = await run_checks(runtime)
        timings["readiness_checks"] = time.perf_counter() - begun
        for result in results:
            timings[f"  check {result.name}"] = result.duration_ms / 1000
    finally:
        await runtime.close()
    return {name: round(seconds, 4) for name, seconds in timings.items()}


def _wrap(module: Any, name: str, label: str, timings: dict[str, float]) -> None:
    original = getattr(module, name, None)
    if original is None:
        return  # renamed since this benchmark was written: that phase goes unreported
    if inspect.iscoroutinefunction(original):

        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            begun = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                timings[label] = timings.get(label, 0.0) + time.perf_counter() - begun

        wrapper: Callable[..., Any | Awaitable[Any]] = timed_async
    else:

        def timed(*args: Any, **kwargs: Any) -> Any:
            begun = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                timings[label] = timings.get(label, 0.0) + time.perf_counter() - begun

        wrapper = timed
    setattr(module, name, wrapper)


if __name__ == "__main__":
    main()
