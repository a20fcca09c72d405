"""Request rate limits per API key and per client IP, on the ``limits`` library.

Moving windows, kept in memory (one process) by default, or in Redis when
``FORGELINE_REDIS_URL`` is set, which every replica must share for a limit
to hold across them. Redis's moving window runs as one script, so
concurrent hits from many processes are counted exactly.

When Redis cannot be reached, requests are let through (and logged):
an outage of the limiter must not become an outage of the API. ``/readyz``
reports the failing check meanwhile.
"""

from __future__ import annotations

import ipaddress
import time
from dataclasses import dataclass

import limits
import structlog
from limits.aio.storage import Storage as AsyncStorage
from limits.aio.strategies import MovingWindowRateLimiter
from limits.storage import storage_from_string

from forgeline import metrics
from forgeline.errors import ConfigurationError
from forgeline.settings import Settings

logger = structlog.get_logger("forgeline.api")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Verdict:
    """The outcome of one hit, with what the ``RateLimit-*`` headers report."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: float

    @property
    def headers(self) -> dict[str, str]:
        """``RateLimit-Limit``, ``-Remaining`` and ``-Reset`` (seconds)."""
        return {
            "RateLimit-Limit": str(self.limit),
            "RateLimit-Remaining": str(self.remaining),
            "RateLimit-Reset": str(max(0, round(self.reset_s))),
        }


class RateLimiter:
    """Moving-window counters in memory or Redis."""

    def __init__(self, settings: Settings) -> None:
        self.per_key = limits.parse(settings.rate_limit_per_key)
        self.per_ip = limits.parse(settings.rate_limit_per_ip)
        self.shared = settings.redis_url is not None
        uri = "async+memory://"
        options: dict[str, float] = {}
        if settings.redis_url is not None:
            uri = "async+" + settings.redis_url.get_secret_value().removeprefix("async+")
            options = {"connect_timeout": 1.0, "stream_timeout": 1.0}  # coredis names
        storage = storage_from_string(uri, **options)
        if not isinstance(storage, AsyncStorage):  # guards the type; "async+" gives one
            raise ConfigurationError(f"FORGELINE_REDIS_URL: unsupported: {uri.split(':')[0]}")
        self.storage = storage
        self._limiter = MovingWindowRateLimiter(storage)

    async def hit(self, rate: limits.RateLimitItem, scope: str, who: str) -> Verdict:
        """Count one request of ``who`` against ``rate``."""
        try:
            allowed = await self._limiter.hit(rate, scope, who)
            stats = await self._limiter.get_window_stats(rate, scope, who)
        except Exception as exc:  # the storage's own errors vary by client library
            logger.warning("rate limiter unavailable", action="ratelimit_down", error=str(exc))
            return Verdict(True, rate.amount, rate.amount, 0.0)
        if not allowed:
            metrics.RATELIMIT_REJECTIONS.inc()
        return Verdict(allowed, rate.amount, stats.remaining, stats.reset_time - time.time())

    async def check(self) -> str:
        """For ``/readyz``: whether the shared store answers."""
        if not await self.storage.check():
            raise ConnectionError("Redis does not answer")
        return "redis" if self.shared else "memory (this process only)"


def parse_networks(values: list[str]) -> list[IPNetwork]:
    """The trusted proxy networks (the settings check validated them)."""
    return [ipaddress.ip_network(value, strict=False) for value in values]


def client_ip(peer: str | None, forwarded_for: str | None, trusted: list[IPNetwork]) -> str:
    """The client's address: the peer, unless the peer is a trusted proxy.

    Behind trusted proxies, ``X-Forwarded-For`` is read from the right, and
    the first address that is not itself a trusted proxy is the client; a
    client cannot choose its bucket by sending its own header.
    """
    if peer is None:
        return "unknown"
    if not forwarded_for or not _is_trusted(peer, trusted):
        return peer
    for hop in reversed([part.strip() for part in forwarded_for.split(",")]):
        if not hop:
            continue
        if not _is_trusted(hop, trusted):
            return hop
    return peer


def _is_trusted(address: str, trusted: list[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in trusted)
