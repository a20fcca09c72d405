"""The running parts of forgeline, built once per process from the settings.

``serve``, ``api``, ``worker`` and the in-process ``generate`` all start the
same :class:`Runtime`; only what they run on top of it differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass

import structlog
from procrastinate import App
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncEngine

from forgeline.auth import (
    ADMIN_KEY_FILE,
    LOCAL_ADMIN_NAME,
    KeyService,
    resolve_secret_key,
    write_private,
)
from forgeline.backends.base import Backend
from forgeline.db import migrate
from forgeline.db.embedded import start_embedded_postgres
from forgeline.db.engine import (
    SessionFactory,
    check_reachable,
    create_engine,
    create_session_factory,
)
from forgeline.errors import ConfigurationError
from forgeline.events.hub import EventHub
from forgeline.jobs.queue import QUEUE_NAME, TASK_NAME, RunnerRetryStrategy, create_queue_app
from forgeline.jobs.runner import JobRunner
from forgeline.jobs.service import JobService
from forgeline.metrics import MeteredBackend
from forgeline.pipelines.registry import PipelineRegistry, load_pipelines
from forgeline.ratelimit import IPNetwork, RateLimiter, parse_networks
from forgeline.settings import Settings
from forgeline.storage import ObjectStorage, Storage

logger = structlog.get_logger("forgeline.runtime")

#: Pause before restarting a queue worker that died (e.g. database restart).
WORKER_RESTART_DELAY_S = 2.0
#: Beyond the drain timeout, how long a stopping worker may take to wind down.
DRAIN_SLACK_S = 3.0
#: How often a worker deletes the streamed detail of long-finished jobs.
COMPACTION_INTERVAL_S = 300.0


def build_backends(settings: Settings) -> dict[str, Backend]:
    """The configured model backend, by name.

    Only the one ``FORGELINE_BACKEND`` names is built: the others may need
    packages (torch) or servers this deployment does not have. Local models
    load on first use, not here, so starting stays quick.
    """
    if settings.backend == "builtin":
        from forgeline.backends.builtin import BuiltinBackend

        return {
            "builtin": BuiltinBackend(
                model_dir=settings.builtin_model_path,
                max_concurrency=settings.builtin_max_concurrency,
            )
        }
    if settings.backend == "transformers":
        # Imports transformers and torch only when asked for (the [local] extra).
        from forgeline.backends.transformers_local import TransformersBackend

        if settings.local_model_path is None:  # the settings check refuses this already
            raise ConfigurationError("FORGELINE_LOCAL_MODEL_PATH: required")
        return {
            "transformers": TransformersBackend(
                model_path=settings.local_model_path,
                device=settings.local_device,
                max_concurrency=settings.local_max_concurrency,
            )
        }
    # Imported only when used, as the other backends are.
    from forgeline.backends.openai_compat import OpenAICompatibleBackend

    api_key = settings.openai_api_key.get_secret_value() if settings.openai_api_key else None
    return {
        "openai": OpenAICompatibleBackend(
            base_url=settings.openai_base_url,
            model=settings.openai_model,
            api_key=api_key,
            connect_timeout_s=settings.backend_connect_timeout_s,
            timeout_s=settings.backend_timeout_s,
            max_concurrency=settings.backend_max_concurrency,
            max_retries=settings.backend_max_retries,
        )
    }


async def _bootstrap_keys(settings: Settings, keys: KeyService) -> str | None:
    """Register ``FORGELINE_ADMIN_KEY``; on a new embedded database, make a local admin key.

    The local key is kept in the data directory (mode 0600) and returned so
    the command that started forgeline can show it once.
    """
    try:
        if settings.admin_key is not None:
            await keys.register(
                settings.admin_key.get_secret_value(), "admin (FORGELINE_ADMIN_KEY)", admin=True
            )
        if not settings.embedded_database or await keys.count() > 0:
            return None
    except ProgrammingError:
        raise ConfigurationError(
            "the database schema is not current: run `forgeline migrate` "
            "(or set FORGELINE_AUTO_MIGRATE=true)"
        ) from None
    new = await keys.create(LOCAL_ADMIN_NAME, admin=True)
    write_private(settings.data_dir / ADMIN_KEY_FILE, new.token)
    return new.token


async def resolve_database(settings: Settings) -> str:
    """The libpq URL to use, starting the embedded server when none is configured."""
    if settings.database_url is not None:
        return settings.database_url.get_secret_value()
    return await asyncio.to_thread(start_embedded_postgres, settings.data_dir)


@dataclass
class Runtime:
    """Database, queue, storage, backends and pipelines of one process."""

    settings: Settings
    engine: AsyncEngine
    sessions: SessionFactory
    queue_app: App
    storage: Storage
    backends: Mapping[str, Backend]
    pipelines: PipelineRegistry
    jobs: JobService
    runner: JobRunner
    hub: EventHub
    keys: KeyService
    limiter: RateLimiter
    #: The local admin key made on this first start of an embedded database, to show once.
    new_admin_key: str | None = None

    @functools.cached_property
    def proxies(self) -> list[IPNetwork]:
        """Trusted proxy networks, whose ``X-Forwarded-For`` is believed."""
        return parse_networks(self.settings.trusted_proxies)

    @classmethod
    async def start(cls, settings: Settings) -> Runtime:
        """Connect everything; migrate first when the settings say so."""
        pipelines = load_pipelines(settings.pipelines)
        storage = ObjectStorage(settings.effective_storage_url)
        conninfo = await resolve_database(settings)
        engine = create_engine(
            conninfo, pool_size=settings.db_pool_size, pool_timeout_s=settings.db_pool_timeout_s
        )
        try:
            # Fail fast and in one line, rather than in a pool's 30 s timeout.
            await check_reachable(engine)
            if settings.should_auto_migrate:
                await migrate.upgrade(engine)
            queue_app = create_queue_app(conninfo, pool_size=settings.db_pool_size)
            await queue_app.open_async()
        except BaseException:
            await engine.dispose()
            raise
        sessions = create_session_factory(engine)
        backends = {
            name: MeteredBackend(backend) for name, backend in build_backends(settings).items()
        }
        if settings.backend not in backends:
            raise ConfigurationError(f"FORGELINE_BACKEND: unknown backend {settings.backend!r}")
        runner = JobRunner(
            sessions=sessions,
            pipelines=pipelines,
            backends=backends,
            default_backend=settings.backend,
            storage=storage,
            retry_backoff_s=settings.retry_backoff_s,
        )
        queue_app.task(
            name=TASK_NAME, queue=QUEUE_NAME, pass_context=True, retry=RunnerRetryStrategy()
        )(runner.run)
        jobs = JobService(
            sessions=sessions,
            queue_app=queue_app,
            pipelines=pipelines,
            max_attempts=settings.max_attempts,
        )
        keys = KeyService(sessions, resolve_secret_key(settings), cache_s=settings.key_cache_s)
        try:
            new_admin_key = await _bootstrap_keys(settings, keys)
        except BaseException:
            await queue_app.close_async()
            await engine.dispose()
            raise
        hub = EventHub(conninfo, on_key_revoked=keys.forget)
        return cls(
            settings,
            engine,
            sessions,
            queue_app,
            storage,
            backends,
            pipelines,
            jobs,
            runner,
            hub,
            keys,
            RateLimiter(settings),
            new_admin_key,
        )

    async def close(self) -> None:
        """Release connections (the embedded database stops when the process exits)."""
        await self.runner.close()
        await self.hub.stop()
        for backend in self.backends.values():
            await backend.aclose()
        await self.queue_app.close_async()
        await self.engine.dispose()

    async def run_worker(self, stop: asyncio.Event) -> None:
        """Run jobs and sweep stalled ones until ``stop`` is set, then drain.

        On stop, the worker takes no new job; running jobs get the drain
        timeout to finish, then are cancelled and handed back to the queue.
        If the queue worker dies (the database went away), it is restarted
        after a pause rather than taking the process down.
        """
        sweeper = asyncio.create_task(self._sweep_forever(stop), name="stall-sweeper")
        try:
            while not stop.is_set():
                await self._run_queue_worker(stop)
                if not stop.is_set():
                    logger.error("worker stopped unexpectedly; restarting", action="worker_restart")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), timeout=WORKER_RESTART_DELAY_S)
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper

    async def _run_queue_worker(self, stop: asyncio.Event) -> None:
        settings = self.settings
        worker = asyncio.create_task(
            self.queue_app.run_worker_async(
                queues=[QUEUE_NAME],
                name=f"{socket.gethostname()}-{os.getpid()}",
                concurrency=settings.worker_concurrency,
                install_signal_handlers=False,
                shutdown_graceful_timeout=settings.drain_timeout_s,
                update_heartbeat_interval=settings.heartbeat_interval_s,
                stalled_worker_timeout=settings.stall_threshold_s,
                # Notifications wake the worker at once; polling is the fallback.
                fetch_job_polling_interval=2.0,
                abort_job_polling_interval=1.0,
            ),
            name="procrastinate-worker",
        )
        stopped = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({worker, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if not worker.done():
                logger.info(
                    "worker draining", action="worker_drain", timeout_s=settings.drain_timeout_s
                )
                worker.cancel()  # Procrastinate turns this into a graceful stop
                # Its housekeeping (heartbeats, fetching) may be waiting for a pooled
                # connection after an outage; the drain budget bounds the wait.
                await asyncio.wait({worker}, timeout=settings.drain_timeout_s + DRAIN_SLACK_S)
                if not worker.done():
                    logger.warning("worker did not stop in time; forcing", action="worker_force")
                    worker.cancel()  # a second cancellation stops it at once
            try:
                await worker
            except asyncio.CancelledError:
                pass
            except Exception:
                logger.exception("worker failed", action="worker_failed")
        finally:
            stopped.cancel()

    async def _sweep_forever(self, stop: asyncio.Event) -> None:
        interval = self.settings.sweep_interval_s
        next_compaction = 0.0
        while not stop.is_set():
            if time.monotonic() >= next_compaction:
                next_compaction = time.monotonic() + COMPACTION_INTERVAL_S
                try:
                    removed = await self.jobs.compact_events(
                        older_than_s=self.settings.event_retention_s
                    )
                    if removed:
                        logger.info("events compacted", action="events_compacted", count=removed)
                except Exception:
                    logger.exception("event compaction failed", action="compaction_failed")
            try:
                recovered = await self.jobs.recover_stalled(
                    stall_threshold_s=self.settings.stall_threshold_s
                )
                if recovered:
                    logger.warning(
                        "stalled jobs handed back",
                        action="stalled_jobs_recovered",
                        count=len(recovered),
                        job_ids=[str(job_id) for job_id in recovered],
                    )
            except Exception:
                # The database may be down; the next sweep tries again.
                logger.exception("stall sweep failed", action="sweep_failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
