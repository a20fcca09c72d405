"""Object storage for artifacts, on obstore (local folder, S3, GCS, Azure)."""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import obstore
from obstore.store import from_url

from forgeline.errors import ConfigurationError, NotFoundError, StorageError

SUPPORTED_SCHEMES = ("file", "s3", "gs", "az", "abfs", "memory")


class Storage(abc.ABC):
    """Where pipelines put files and the API reads them back."""

    @abc.abstractmethod
    async def put(self, key: str, data: bytes) -> None:
        """Write ``data`` at ``key``, replacing what was there."""

    @abc.abstractmethod
    def open(self, key: str) -> AsyncIterator[bytes]:
        """Stream the object at ``key`` in chunks; ``NotFoundError`` if absent."""

    @abc.abstractmethod
    async def check(self) -> str:
        """Verify the store answers; return where it is."""


class ObjectStorage(Storage):
    """Storage on any URL obstore understands."""

    def __init__(self, url: str) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in SUPPORTED_SCHEMES:
            raise ConfigurationError(
                f"FORGELINE_STORAGE_URL: unsupported scheme {scheme!r} "
                f"(use one of {', '.join(SUPPORTED_SCHEMES)})"
            )
        self.url = url
        try:
            self._store = from_url(url, mkdir=True) if scheme == "file" else from_url(url)
        except Exception as exc:  # obstore raises its own hierarchy for bad URLs
            raise ConfigurationError(f"FORGELINE_STORAGE_URL: {exc}") from None

    async def put(self, key: str, data: bytes) -> None:
        try:
            await obstore.put_async(self._store, key, data)
        except Exception as exc:
            raise StorageError(f"could not write {key} to {self.url}: {exc}") from None

    async def open(self, key: str) -> AsyncIterator[bytes]:
        try:
            result = await obstore.get_async(self._store, key)
        except FileNotFoundError:
            raise NotFoundError(f"no object {key}") from None
        except Exception as exc:
            raise StorageError(f"could not read {key} from {self.url}: {exc}") from None
        async for chunk in result:
            yield bytes(chunk)

    async def check(self) -> str:
        try:
            await obstore.list_with_delimiter_async(self._store, prefix="jobs/")
        except Exception as exc:
            raise StorageError(f"storage at {self.url} does not answer: {exc}") from None
        return self.url


def artifact_key(job_id: object, name: str) -> str:
    """The deterministic key of a job's artifact, so a retry overwrites it."""
    return f"jobs/{job_id}/{name}"
