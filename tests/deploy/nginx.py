"""deploy/nginx/nginx.conf run by the machine's nginx, mapped onto test ports.

The file is used as committed; only what differs between a container and a
test is rewritten: the upstream address, the listening ports, and the
folders (/tmp, the certificate) moved into the test's own directory.
"""

from __future__ import annotations

import re
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.deploy.conftest import repo_path

NGINX_CONF = repo_path("deploy", "nginx", "nginx.conf")


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


def render(upstream: str, http_port: int, https_port: int, workdir: Path) -> str:
    """The committed configuration with this test's addresses and folders."""
    text = NGINX_CONF.read_text()
    text = text.replace("server api:8000", f"server {upstream}")
    text = re.sub(r"^\s*listen \[::\].*\n", "", text, flags=re.MULTILINE)
    text = text.replace("listen 80;", f"listen 127.0.0.1:{http_port};")
    text = text.replace("listen 443 ssl", f"listen 127.0.0.1:{https_port} ssl")
    text = text.replace(" /tmp/", f" {workdir}/run/")
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
        conf = self.workdir / "nginx.conf"
        conf.write_text(render(upstream, self.http_port, self.https_port, self.workdir))
        binary = nginx_binary()
        # Workers as root: the test's folders are private to root.
        check = subprocess.run(
            [binary, "-t", "-p", str(self.workdir), "-c", str(conf), "-g", "user root;"],
            capture_output=True, text=True, check=False, timeout=30,
        )  # fmt: skip
        if check.returncode != 0:
            raise AssertionError(f"nginx -t failed:\n{check.stderr}")
        self.log = (self.workdir / "nginx.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "-p", str(self.workdir), "-c", str(conf), "-g", "daemon off; user root;"],
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
