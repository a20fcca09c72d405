"""ObjectStorage on a real folder through a file:// URL."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from forgeline.errors import ConfigurationError, NotFoundError
from forgeline.storage import ObjectStorage, artifact_key


@pytest.fixture
def make_storage(tmp_path: Path) -> Callable[..., ObjectStorage]:
    """Builds storage on a folder of this test (created on demand), returning the store."""

    def make(folder: str = "artifacts") -> ObjectStorage:
        return ObjectStorage((tmp_path / folder).as_uri())

    return make


async def read_all(storage: ObjectStorage, key: str) -> bytes:
    """Every chunk of the object at ``key``, joined."""
    return b"".join([chunk async for chunk in storage.open(key)])


def files_under(root: Path) -> list[Path]:
    """Every regular file below ``root``, relative to it."""
    return sorted(
        Path(folder, name).relative_to(root) for folder, _, names in os.walk(root) for name in names
    )


async def test_put_then_open_returns_the_same_bytes(
    make_storage: Callable[..., ObjectStorage], tmp_path: Path
) -> None:
    """What is put at a nested key comes back byte for byte, as a file under that path."""
    storage = make_storage()
    key = artifact_key(uuid.uuid4(), "story.md")
    data = "# Title\n\nÉcume et sel.\n".encode()

    await storage.put(key, data)

    assert await read_all(storage, key) == data
    assert (tmp_path / "artifacts" / key).read_bytes() == data


async def test_large_object_round_trips(make_storage: Callable[..., ObjectStorage]) -> None:
    """An object of several megabytes streams back whole, whatever the chunking."""
    storage = make_storage()
    data = os.urandom(5 * 1024 * 1024 + 17)

    await storage.put("jobs/big/blob.bin", data)

    assert await read_all(storage, "jobs/big/blob.bin") == data


async def test_empty_object_round_trips(make_storage: Callable[..., ObjectStorage]) -> None:
    """An empty object can be stored and read back as empty."""
    storage = make_storage()

    await storage.put("jobs/empty/none.txt", b"")

    assert await read_all(storage, "jobs/empty/none.txt") == b""


async def test_overwrite_keeps_one_object_with_the_new_content(
    make_storage: Callable[..., ObjectStorage], tmp_path: Path
) -> None:
    """Putting the same key twice replaces the object: one file, the second content."""
    storage = make_storage()
    key = "jobs/retry/story.md"

    await storage.put(key, b"first attempt, longer than the second")
    await storage.put(key, b"second")

    assert await read_all(storage, key) == b"second"
    assert files_under(tmp_path / "artifacts") == [Path(key)]


async def test_open_of_a_missing_key_is_not_found(
    make_storage: Callable[..., ObjectStorage],
) -> None:
    """Reading a key never written raises NotFoundError (a 404 at the API)."""
    storage = make_storage()
    await storage.put("jobs/other/story.md", b"x")

    with pytest.raises(NotFoundError, match=re.escape("jobs/missing/story.md")):
        await read_all(storage, "jobs/missing/story.md")


async def test_check_answers_with_the_url(make_storage: Callable[..., ObjectStorage]) -> None:
    """``check()`` succeeds on an empty, freshly created store and reports its URL."""
    storage = make_storage("fresh/nested")

    assert await storage.check() == storage.url


def test_folder_is_created_on_demand(
    make_storage: Callable[..., ObjectStorage], tmp_path: Path
) -> None:
    """A file:// URL to a folder that does not exist yet creates it."""
    make_storage("not/yet/there")

    assert (tmp_path / "not" / "yet" / "there").is_dir()


@pytest.mark.parametrize("url", ["ftp://example.com/bucket", "http://example.com/x", "/var/x"])
def test_unsupported_scheme_names_the_variable(url: str) -> None:
    """A URL obstore is not configured for fails at start, naming FORGELINE_STORAGE_URL."""
    with pytest.raises(ConfigurationError) as caught:
        ObjectStorage(url)

    assert caught.value.message.startswith("FORGELINE_STORAGE_URL: unsupported scheme")
    assert "file" in caught.value.message
