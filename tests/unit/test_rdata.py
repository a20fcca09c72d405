"""The reader of R lazy-load data, on files written here in R's XDR format."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import pytest

from forgeline.training.rdata import RDataError, RObject, read_lazyload, unserialize

HEADER = b"X\n" + struct.pack(">iii", 2, 0x040201, 0x020300)
HAS_ATTR, HAS_TAG = 1 << 9, 1 << 10


def word(value: int) -> bytes:
    """One big-endian 32-bit integer."""
    return struct.pack(">i", value)


def chars(text: str) -> bytes:
    """A CHARSXP."""
    data = text.encode()
    return word(9) + word(len(data)) + data


def strings(*texts: str, attrs: bytes = b"") -> bytes:
    """A character vector, with an attribute pairlist when given."""
    flags = 16 | (HAS_ATTR if attrs else 0)
    return word(flags) + word(len(texts)) + b"".join(chars(t) for t in texts) + attrs


def names(*texts: str) -> bytes:
    """An attribute pairlist holding only ``names``."""
    return word(2 | HAS_TAG) + word(1) + chars("names") + strings(*texts) + word(254)


def write_lazyload(folder: Path, objects: dict[str, bytes]) -> None:
    """Write ``objects`` (serialised bodies) as Rdata.rdb with its Rdata.rdx index."""
    db = b""
    entries = b""
    for body in objects.values():
        payload = HEADER + body
        chunk = struct.pack(">I", len(payload)) + zlib.compress(payload)
        entries += word(13) + word(2) + word(len(db)) + word(len(chunk))
        db += chunk
    variables = word(19 | HAS_ATTR) + word(len(objects)) + entries + names(*objects)
    index = (
        word(19 | HAS_ATTR)
        + word(3)
        + variables
        + word(19)
        + word(0)
        + word(10)
        + word(1)
        + word(1)
        + names("variables", "references", "compressed")
    )
    (folder / "Rdata.rdb").write_bytes(db)
    (folder / "Rdata.rdx").write_bytes(gzip.compress(HEADER + index))


def test_character_vectors_are_read_by_name(tmp_path: Path) -> None:
    """Each variable in the database comes back as its list of strings."""
    write_lazyload(
        tmp_path,
        {"emma": strings("EMMA", "", "By Jane Austen"), "persuasion": strings("Persuasion")},
    )

    objects = read_lazyload(tmp_path)

    assert set(objects) == {"emma", "persuasion"}
    assert objects["emma"].value == ["EMMA", "", "By Jane Austen"]
    assert objects["persuasion"].value == ["Persuasion"]


def test_attributes_and_missing_strings() -> None:
    """A vector's attributes are read, and NA strings become None."""
    body = word(16 | HAS_ATTR) + word(2) + chars("a") + word(9) + word(-1) + names("x", "y")

    value = unserialize(HEADER + body)

    assert isinstance(value, RObject)
    assert value.value == ["a", None]
    assert value.attributes["names"].value == ["x", "y"]


def test_truncated_data_is_an_error() -> None:
    """Bytes that end mid-object raise RDataError rather than returning part of it."""
    with pytest.raises(RDataError):
        unserialize(HEADER + strings("complete")[:-3])
