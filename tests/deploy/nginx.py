"""deploy/nginx/nginx.conf run by the machine's nginx, mapped onto test ports.

The file is used as committed; only what differs between a container and a
test is rewritten: the upstream address, the listening ports, and the
folders (/tmp, the certificate) moved into the test's own directory.
"""

from __future__ import annotations

import re
import shlex
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.conftest import repo_path

NGINX_CONF = repo_path("deploy", "nginx", "nginx.conf")
UPSTREAM_CONF = repo_path("deploy", "nginx", "upstream.conf")


def nginx_binary() -> str:
    """Path of nginx; fails (never skips) when scripts/system-deps was not run."""
    found = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if found is None:
        raise AssertionError("nginx is not installed: run scripts/system-deps as root")
    return found


def self_signed_certificate(folder: Path, host: str = "localhost") -> tuple[Path, Path]:
    """A certificate and key for ``host``, as tls.crt and tls.key in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "tls.crt", folder / "tls.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", f"/CN={host}", "-addext", f"subjectAltName=DNS:{host},IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def render_upstream(upstream: str) -> str:
    """The committed upstream.conf with this test's api address."""
    return UPSTREAM_CONF.read_text().replace("server api:8000", f"server {upstream}")


def render(http_port: int, https_port: int, workdir: Path) -> str:
    """The committed configuration with this test's ports and folders."""
    # Folders first: the test's own paths live under /tmp too.
    text = NGINX_CONF.read_text().replace(" /tmp/", f" {workdir}/run/")
    text = text.replace("/etc/nginx/upstream.conf", str(workdir / "upstream.conf"))
    text = re.sub(r"^\s*listen \[::\].*\n", "", text, flags=re.MULTILINE)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl")
    return text.replace("/etc/nginx/tls/", f"{workdir}/tls/")


@dataclass
class Nginx:
    """A running nginx with the rendered configuration."""

    workdir: Path
    http_port: int
    https_port: int
    process: subprocess.Popen[bytes] | None = None

    def start(self, upstream: str) -> Nginx:
        (self.workdir / "run").mkdir(parents=True, exist_ok=True)
        self_signed_certificate(self.workdir / "tls")
        (self.workdir / "upstream.conf").write_text(render_upstream(upstream))
        (self.workdir / "nginx.conf").write_text(
            render(self.http_port, self.https_port, self.workdir)
        )
        check = subprocess.run(
            shlex.split(self.command("-t")), capture_output=True, text=True, check=False, timeout=30
        )
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stderr}")
        self.log = (self.workdir / "nginx.log").open("wb")
        self.process = subprocess.Popen(
            [*shlex.split(self.command()), "-g", "daemon off;"],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://127.0.0.1:{self.http_port}/", timeout=1)
                return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError("nginx did not start listening")

    def command(self, *args: str) -> str:
        """The nginx command line for this instance (``-t``, ``-s reload``...).

        Workers run as root: the test's folders are private to root.
        """
        conf = self.workdir / "nginx.conf"
        extra = " ".join(args)
        return f"{nginx_binary()} -p {self.workdir} -c {conf} -g 'user root;' {extra}".strip()

    @property
    def upstream_file(self) -> Path:
        """The upstream.conf this nginx includes."""
        return self.workdir / "upstream.conf"

    @property
    def certificate(self) -> Path:
        """The self-signed certificate (the CA for clients)."""
        return self.workdir / "tls" / "tls.crt"

    @property
    def tls_context(self) -> ssl.SSLContext:
        """A TLS context trusting nginx's self-signed certificate."""
        return ssl.create_default_context(cafile=self.workdir / "tls" / "tls.crt")

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.https_port}"

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)
        if self.process is not None:
            self.log.close()
