"""Read character vectors out of an installed R package's lazy-load data.

Debian ships public-domain books as R data packages (``r-cran-janeaustenr``
holds Jane Austen's six novels). Their ``data/Rdata.rdb`` is a run of
compressed objects in R's XDR serialisation format, indexed by ``Rdata.rdx``.
This reader understands the part of that format data frames of text use, so
the corpus can be taken without R installed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# SEXP type codes from R's Rinternals.h and serialize.c.
_NIL, _SYM, _LIST, _CLO, _ENV, _PROM, _LANG = 0, 1, 2, 3, 4, 5, 6
_CHAR, _LGL, _INT, _REAL, _CPLX, _STR, _DOT, _VEC, _EXPR, _RAW = (
    9,
    10,
    13,
    14,
    15,
    16,
    17,
    19,
    20,
    24,
)
_REF, _NILVALUE, _GLOBALENV, _UNBOUND, _MISSING, _BASENS = 255, 254, 253, 252, 251, 250
_EMPTYENV, _BASEENV, _ATTRLANG, _ATTRLIST, _ALTREP = 242, 241, 240, 239, 238
_NA_INT = -(2**31)


class RDataError(ValueError):
    """The bytes are not R serialisation this reader understands."""


@dataclass
class RObject:
    """An R value: ``value`` holds the Python form, ``attributes`` its R attributes."""

    value: Any
    attributes: dict[str, Any] = field(default_factory=dict)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.refs: list[Any] = []

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        if len(chunk) != n:
            raise RDataError("truncated R data")
        self.pos += n
        return chunk

    def word(self) -> int:
        value: int = struct.unpack(">i", self.take(4))[0]
        return value

    def length(self) -> int:
        n = self.word()
        if n == -1:  # long vector: two more words
            upper, lower = self.word(), self.word()
            n = (upper << 32) + lower
        return n

    def header(self) -> None:
        if self.take(2) != b"X\n":
            raise RDataError("not XDR R serialisation")
        version = self.word()
        self.word()  # the writer's R version
        self.word()  # the oldest R that reads it
        if version == 3:
            self.take(self.word())  # native encoding name

    def item(self) -> Any:
        flags = self.word()
        kind = flags & 0xFF
        has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
        if kind in (_NILVALUE, _EMPTYENV, _BASEENV, _GLOBALENV, _UNBOUND, _MISSING, _BASENS):
            return None
        if kind == _REF:
            index = flags >> 8 or self.word()
            return self.refs[index - 1]
        if kind == _SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == _ENV:
            self.word()  # locked
            env = RObject({})
            self.refs.append(env)
            self.item(), self.item(), self.item(), self.item()  # enclos, frame, hashtab, attrib
            return env
        if kind in (_LIST, _LANG, _CLO, _PROM, _DOT, _ATTRLANG, _ATTRLIST):
            return self.pairlist(has_attr, has_tag)
        if kind == _CHAR:
            n = self.word()
            return None if n == -1 else self.take(n).decode("utf-8", errors="replace")
        if kind == _ALTREP:
            raise RDataError("compact (ALTREP) vectors are not supported")
        value: Any
        if kind in (_LGL, _INT):
            n = self.length()
            value = [None if v == _NA_INT else v for v in struct.unpack(f">{n}i", self.take(4 * n))]
        elif kind == _REAL:
            n = self.length()
            value = list(struct.unpack(f">{n}d", self.take(8 * n)))
        elif kind == _CPLX:
            n = self.length()
            self.take(16 * n)
            value = None
        elif kind == _RAW:
            value = self.take(self.length())
        elif kind == _STR or kind in (_VEC, _EXPR):
            value = [self.item() for _ in range(self.length())]
        else:
            raise RDataError(f"unsupported R type {kind}")
        attributes = self.attributes() if has_attr else {}
        return RObject(value, attributes)

    def pairlist(self, has_attr: bool, has_tag: bool) -> dict[str, Any]:
        """A pairlist as a dict by tag (attributes and argument lists)."""
        out: dict[str, Any] = {}
        while True:
            if has_attr:
                self.item()
            tag = self.item() if has_tag else None
            out[str(tag) if tag is not None else f"_{len(out)}"] = self.item()
            flags = self.word()
            kind = flags & 0xFF
            if kind == _NILVALUE:
                return out
            if kind not in (_LIST, _LANG, _ATTRLIST, _ATTRLANG):
                raise RDataError(f"unexpected pairlist tail of type {kind}")
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))

    def attributes(self) -> dict[str, Any]:
        flags = self.word()
        if flags & 0xFF == _NILVALUE:
            return {}
        return self.pairlist(bool(flags & (1 << 9)), bool(flags & (1 << 10)))


def unserialize(data: bytes) -> Any:
    """One R object from uncompressed XDR serialisation bytes."""
    reader = _Reader(data)
    reader.header()
    return reader.item()


def _decompress_chunk(chunk: bytes) -> bytes:
    # A lazy-load chunk: 4-byte uncompressed length, then (R >= 2.10) a type byte
    # for bzip2/xz/none; plain zlib has no type byte.
    kind = chunk[4:5]
    if kind == b"2":
        return bz2.decompress(chunk[5:])
    if kind == b"Z":
        return lzma.decompress(chunk[5:])
    if kind == b"0":
        return chunk[5:]
    return zlib.decompress(chunk[4:])


def read_lazyload(data_dir: Path, name: str = "Rdata") -> dict[str, Any]:
    """Every object in ``data_dir/<name>.rdb``, by variable name."""
    index = unserialize(gzip.decompress((data_dir / f"{name}.rdx").read_bytes()))
    if not isinstance(index, RObject):
        raise RDataError("unexpected lazy-load index")
    names = index.attributes["names"].value
    variables = index.value[names.index("variables")]
    db = (data_dir / f"{name}.rdb").read_bytes()
    out: dict[str, Any] = {}
    for var, where in zip(variables.attributes["names"].value, variables.value, strict=True):
        offset, size = (int(v) for v in where.value)
        out[var] = unserialize(_decompress_chunk(db[offset : offset + size]))
    return out
