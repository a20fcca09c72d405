"""podman for the deploy tests: local base images, the forgeline image, containers.

The test machines have podman but no Docker daemon and no registry access
(shared CONTAINERS.md), so the base images the Dockerfile takes as build
arguments are built here from Debian's packages: a minimal Debian root made
by debootstrap, a Python image on it, and an image holding the uv binary of
``scripts/bootstrap``. Images are kept in ``.tools/podman`` between runs and
rebuilt only when missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
IMAGES_DIR = Path(__file__).resolve().parent / "images"
STATE_DIR = REPO_ROOT / ".tools" / "podman"

DEBIAN_IMAGE = "localhost/debian:bookworm-slim"
PYTHON_IMAGE = "localhost/python:3.11-slim-bookworm"
UV_IMAGE = "localhost/uv:local"
FORGELINE_IMAGE = "localhost/forgeline:test"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
#: Label of the stand-in server images: a digest of the files they are built from.
SOURCE_LABEL = "org.forgeline.test.source"

#: Folders of the debootstrapped root that no container needs.
ROOTFS_TRIM = ("usr/share/doc", "usr/share/man", "usr/share/info", "var/lib/apt/lists")
#: What Debian's own slim images leave out of every package, the ones
#: installed later included (debuerreotype's "slimify"): documentation,
#: manuals and translations, keeping copyrights and the locale aliases.
DPKG_SLIM = """\
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
"""


class PodmanMissingError(RuntimeError):
    """podman or a tool it needs is not installed."""


@dataclass(frozen=True)
class BuildResult:
    """A built image and what it cost."""

    tag: str
    seconds: float
    size_bytes: int


class Podman:
    """Runs podman with the configuration these machines need."""

    def __init__(self, state_dir: Path = STATE_DIR) -> None:
        if shutil.which("podman") is None:
            raise PodmanMissingError("podman is not installed: run scripts/system-deps as root")
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        storage_conf = state_dir / "storage.conf"
        storage_conf.write_text(
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{state_dir / "storage"}"\n'
            f'runroot = "{state_dir / "run"}"\n'
        )
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(IMAGES_DIR / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(storage_conf),
        }

    def run(
        self, *args: str, timeout_s: float = 120.0, check: bool = True, input_bytes: bytes = b""
    ) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``; raises with its output when ``check`` and it fails."""
        result = subprocess.run(
            ["podman", *args],
            env=self.env,
            capture_output=True,
            timeout=timeout_s,
            input=input_bytes or None,
            check=False,
        )
        completed = subprocess.CompletedProcess(
            result.args,
            result.returncode,
            result.stdout.decode(errors="replace"),
            # podman without systemd complains about healthcheck timers on
            # every container command; those lines are noise here.
            "\n".join(
                line
                for line in result.stderr.decode(errors="replace").splitlines()
                if "systemd" not in line
            ),
        )
        if check and completed.returncode != 0:
            raise AssertionError(
                f"podman {' '.join(args)} exited {completed.returncode}:\n"
                f"{completed.stdout[-4000:]}\n{completed.stderr[-4000:]}"
            )
        return completed

    def run_bytes(self, *args: str, timeout_s: float = 300.0) -> bytes:
        """``podman ARGS``'s standard output as bytes (``podman save``)."""
        result = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, timeout=timeout_s, check=False
        )
        if result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)}: {result.stderr.decode()[-2000:]}")
        return result.stdout

    def has_image(self, tag: str) -> bool:
        """Whether ``tag`` is in local storage."""
        return self.run("image", "exists", tag, check=False).returncode == 0

    def image_size(self, tag: str) -> int:
        """Uncompressed size of ``tag`` in bytes, as ``podman images`` reports it."""
        return int(self.run("image", "inspect", tag, "--format", "{{.Size}}").stdout.strip())

    def image_label(self, tag: str, label: str) -> str:
        """The value of one of ``tag``'s labels ("" when it has none)."""
        labels = self.run("image", "inspect", tag, "--format", "{{json .Labels}}").stdout
        return str((json.loads(labels) or {}).get(label, ""))

    def build(
        self,
        tag: str,
        containerfile: Path,
        context: Path,
        build_args: dict[str, str] | None = None,
        extra: Sequence[str] = (),
        timeout_s: float = 600.0,
    ) -> BuildResult:
        """Build ``containerfile`` as ``tag``; returns the time it took and the size."""
        args = ["build", "--network=host", "--format", "docker", "-f", str(containerfile)]
        for name, value in (build_args or {}).items():
            args += ["--build-arg", f"{name}={value}"]
        args += [*extra, "-t", tag, str(context)]
        started = time.monotonic()
        self.run(*args, timeout_s=timeout_s)
        return BuildResult(tag, time.monotonic() - started, self.image_size(tag))

    # -- base images ----------------------------------------------------------
    def ensure_debian(self) -> None:
        """``localhost/debian:bookworm-slim`` from debootstrap, trimmed."""
        if self.has_image(DEBIAN_IMAGE):
            return
        if shutil.which("debootstrap") is None:
            raise PodmanMissingError("debootstrap is not installed: run scripts/system-deps")
        with tempfile.TemporaryDirectory(dir=self.state_dir) as scratch:
            root = Path(scratch) / "rootfs"
            subprocess.run(
                ["debootstrap", "--variant=minbase", "bookworm", str(root), DEBIAN_MIRROR],
                capture_output=True,
                check=True,
                timeout=600,
            )
            for folder in ROOTFS_TRIM:
                for child in (root / folder).glob("*"):
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            for child in (root / "usr/share/locale").glob("*"):
                if child.name != "locale.alias":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
            (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(DPKG_SLIM)
            for cached in (root / "var/cache/apt").glob("**/*"):
                if cached.is_file():
                    cached.unlink()
            tar = subprocess.run(
                ["tar", "-C", str(root), "-c", "."], capture_output=True, check=True, timeout=300
            )
            self.run(
                "import",
                "--change",
                'CMD ["/bin/bash"]',
                "-",
                DEBIAN_IMAGE,
                input_bytes=tar.stdout,
                timeout_s=300,
            )

    def ensure_python(self) -> None:
        """A stand-in for the python slim image, from Debian's python3."""
        self.ensure_debian()
        if not self.has_image(PYTHON_IMAGE):
            self.build(
                PYTHON_IMAGE,
                IMAGES_DIR / "python.Containerfile",
                IMAGES_DIR,
                {"DEBIAN_IMAGE": DEBIAN_IMAGE},
            )

    def ensure_uv(self) -> None:
        """A stand-in for ghcr.io/astral-sh/uv holding the bootstrap's uv binary."""
        if self.has_image(UV_IMAGE):
            return
        with tempfile.TemporaryDirectory() as context:
            for name in ("uv", "uvx"):
                source = REPO_ROOT / ".tools" / "bin" / name
                if not source.exists():
                    raise PodmanMissingError(f"{source} missing: run scripts/bootstrap")
                shutil.copy2(source, Path(context) / name)
            self.build(UV_IMAGE, IMAGES_DIR / "uv.Containerfile", Path(context))

    def ensure_server_image(self, name: str) -> str:
        """``localhost/NAME:bookworm`` from ``images/NAME.Containerfile`` (postgres, redis...).

        Built on the local Debian image, or on the local Python image for a
        server installed with pip (the S3 stand-in).
        """
        self.ensure_python()
        tag = f"localhost/{name}:bookworm"
        # Rebuilt when its Containerfile or a file it copies (NAME-*) changed.
        sources = sorted([IMAGES_DIR / f"{name}.Containerfile", *IMAGES_DIR.glob(f"{name}-*")])
        digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
        if not self.has_image(tag) or self.image_label(tag, SOURCE_LABEL) != digest:
            self.build(
                tag,
                IMAGES_DIR / f"{name}.Containerfile",
                IMAGES_DIR,
                {"DEBIAN_IMAGE": DEBIAN_IMAGE, "PYTHON_IMAGE": PYTHON_IMAGE},
                [*ca_secret(), "--label", f"{SOURCE_LABEL}={digest}"],
            )
        return tag

    def build_forgeline(self, tag: str = FORGELINE_IMAGE) -> BuildResult:
        """Build deploy/Dockerfile on the local base images, as a user would."""
        self.ensure_python()
        self.ensure_uv()
        return self.build(
            tag,
            REPO_ROOT / "deploy" / "Dockerfile",
            REPO_ROOT,
            {"PYTHON_IMAGE": PYTHON_IMAGE, "UV_IMAGE": UV_IMAGE},
            ca_secret(),
        )


def ca_secret() -> list[str]:
    """``--secret id=ca,...`` with the machine's CA bundle, when it has one.

    The machine's HTTPS proxy is trusted only through this bundle; a secret
    mount is never written into a layer.
    """
    ca_bundle = Path(os.environ.get("SSL_CERT_FILE", "/etc/ssl/certs/ca-certificates.crt"))
    return ["--secret", f"id=ca,src={ca_bundle}"] if ca_bundle.is_file() else []
