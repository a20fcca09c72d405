"""Start forgeline's commands as real subprocesses and wait for them, with bounds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def forgeline_env(settings_env: Mapping[str, str]) -> dict[str, str]:
    """The environment for a forgeline subprocess: ours, minus FORGELINE_*, plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FORGELINE_")}
    # Test-only pipelines live in tests/support; make them importable.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    env.update(settings_env)
    return env


@dataclass
class ForgelineProcess:
    """A running ``forgeline`` command, with its output kept in a file."""

    args: list[str]
    env: dict[str, str]
    log_path: Path
    port: int | None = None
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> ForgelineProcess:
        """Start the command (returns at once)."""
        # The child keeps its own copy of the file descriptor.
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "forgeline", *self.args],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    @property
    def url(self) -> str:
        """Base URL of an ``api`` or ``serve`` process."""
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``/readyz`` until 200; fail with the process's output if it does not come."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"forgeline exited with {self.process.returncode}:\n{self.output()}"
                )
            try:
                if httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"forgeline not ready after {timeout_s} s:\n{self.output()}")

    def output(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: signal.Signals) -> None:
        """Send ``signum`` if the process still runs."""
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def kill(self) -> None:
        """kill -9."""
        self.signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM, wait for exit (kill -9 past ``timeout_s``); returns the exit status."""
        self.signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"forgeline ignored SIGTERM for {timeout_s} s") from None


def run_cli(
    args: list[str], env: Mapping[str, str], timeout_s: float = 120.0, input_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``forgeline ARGS`` to completion and return its result."""
    return subprocess.run(
        [sys.executable, "-m", "forgeline", *args],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
        input=input_text,
        check=False,
    )


def settings_env(**values: object) -> dict[str, str]:
    """``FORGELINE_*`` variables from keyword arguments (``port=1`` → ``FORGELINE_PORT=1``)."""
    return {f"FORGELINE_{name.upper()}": str(value) for name, value in values.items()}
