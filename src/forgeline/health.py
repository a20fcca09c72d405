"""Readiness checks: database, queue, storage and model backends, each timed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text

from forgeline.errors import ConfigurationError
from forgeline.runtime import Runtime

#: Longest a single check may take before it counts as failed.
CHECK_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class CheckResult:
    """One dependency's answer."""

    name: str
    ok: bool
    critical: bool
    detail: str
    duration_ms: float


async def _timed(
    name: str, probe: Callable[[], Awaitable[str]], *, critical: bool, timeout_s: float
) -> CheckResult:
    started = time.perf_counter()
    try:
        detail = await asyncio.wait_for(probe(), timeout=timeout_s)
        ok = True
    except TimeoutError:
        detail, ok = f"no answer within {timeout_s:g} s", False
    except Exception as exc:  # a probe's failure is its report, whatever the cause
        detail, ok = str(exc) or type(exc).__name__, False
    return CheckResult(name, ok, critical, detail, round((time.perf_counter() - started) * 1000, 1))


async def run_checks(runtime: Runtime, *, timeout_s: float = CHECK_TIMEOUT_S) -> list[CheckResult]:
    """Check every dependency concurrently.

    Model backends are not critical: a replica that cannot reach its model
    server still serves job status, results and streams, so it stays in
    rotation and the failure is reported instead.
    """

    async def database() -> str:
        async with runtime.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        return "reachable"

    async def queue() -> str:
        if not await runtime.queue_app.job_manager.check_connection_async():
            raise ConfigurationError("queue schema missing: run `forgeline migrate`")
        return "reachable"

    checks = [
        _timed("database", database, critical=True, timeout_s=timeout_s),
        _timed("queue", queue, critical=True, timeout_s=timeout_s),
        _timed("storage", runtime.storage.check, critical=True, timeout_s=timeout_s),
    ]
    if runtime.limiter.shared:
        # Replicas that cannot share their counters would each admit the whole limit.
        checks.append(_timed("redis", runtime.limiter.check, critical=True, timeout_s=timeout_s))
    checks += [
        _timed(f"backend:{name}", backend.check, critical=False, timeout_s=timeout_s)
        for name, backend in runtime.backends.items()
    ]
    return list(await asyncio.gather(*checks))
