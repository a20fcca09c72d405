"""Training text: files on disk, or a public-domain corpus fetched from Debian.

Training reads a list of UTF-8 text files, one document each, so a later
fine-tuning run takes a user's files the same way. :func:`fetch_austen`
prepares the default corpus, Jane Austen's six novels as Debian packages them
in ``r-cran-janeaustenr``, and records where they came from.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from forgeline.training.rdata import RObject, read_lazyload

#: The Debian package holding the default corpus, and where its data lies.
AUSTEN_PACKAGE = "r-cran-janeaustenr"
AUSTEN_DATA_DIR = "usr/lib/R/site-library/janeaustenr/data"
AUSTEN_LICENCE = (
    "The novels (1811-1818) are in the public domain; the R packaging is MIT "
    "(Julia Silge, Debian: Andreas Tille). A model trained on them may be "
    "redistributed without restriction."
)


@dataclass(frozen=True)
class Provenance:
    """Where a fetched corpus came from, for the model card."""

    source: str
    package: str
    version: str
    sha256: str
    licence: str
    documents: tuple[str, ...]


def read_corpus(paths: list[Path]) -> list[str]:
    """The text of each file, in order; empty files are refused."""
    texts: list[str] = []
    for path in paths:
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise ValueError(f"{path}: empty training file")
        texts.append(text)
    return texts


def fetch_austen(dest: Path) -> tuple[list[Path], Provenance]:
    """Download the Austen package with ``apt-get download`` and write one file per novel.

    Needs ``apt-get`` and ``dpkg-deb`` (Debian and its derivatives). Writes
    ``dest/<novel>.txt`` and ``dest/provenance.json``.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise RuntimeError("fetching the default corpus needs apt-get and dpkg-deb (Debian)")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        # apt drops privileges to _apt for downloads; a world-writable folder lets it.
        work.chmod(0o777)
        download = subprocess.run(  # noqa: S603 - fixed arguments, no shell
            ["apt-get", "download", "-q", AUSTEN_PACKAGE],  # noqa: S607 - found on PATH
            cwd=work,
            check=False,
            capture_output=True,
            text=True,
        )
        if download.returncode != 0:
            raise RuntimeError(
                f"apt-get download {AUSTEN_PACKAGE} failed (run `apt-get update` first if the "
                f"package lists are empty): {download.stderr.strip()}"
            )
        (deb,) = work.glob(f"{AUSTEN_PACKAGE}_*.deb")
        version = subprocess.run(  # noqa: S603
            ["dpkg-deb", "--field", str(deb), "Version"],  # noqa: S607
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        sha256 = hashlib.sha256(deb.read_bytes()).hexdigest()
        unpacked = work / "unpacked"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True)  # noqa: S603,S607
        novels = read_lazyload(unpacked / AUSTEN_DATA_DIR)
    paths: list[Path] = []
    for name in sorted(novels):
        novel = novels[name]
        if not isinstance(novel, RObject) or not all(isinstance(x, str) for x in novel.value):
            raise ValueError(f"{AUSTEN_PACKAGE}: {name} is not a character vector")
        path = dest / f"{name}.txt"
        path.write_text(reflow(novel.value), encoding="utf-8")
        paths.append(path)
    provenance = Provenance(
        source="Debian package archive (apt-get download)",
        package=AUSTEN_PACKAGE,
        version=version,
        sha256=sha256,
        licence=AUSTEN_LICENCE,
        documents=tuple(p.name for p in paths),
    )
    (dest / "provenance.json").write_text(json.dumps(asdict(provenance), indent=2) + "\n")
    return paths, provenance


def reflow(lines: list[str]) -> str:
    """Join hard-wrapped lines into one line per paragraph, blank line between.

    Underscores marking italics in the source text are dropped.
    """
    paragraphs: list[str] = []
    current: list[str] = []
    for line in [*lines, ""]:
        stripped = line.strip()
        if stripped:
            current.append(stripped)
        elif current:
            paragraphs.append(re.sub(r"\s+", " ", " ".join(current)).replace("_", ""))
            current = []
    return "\n\n".join(paragraphs) + "\n"
