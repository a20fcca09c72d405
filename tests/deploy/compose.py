"""A Compose project brought up by podman-compose, in Docker Compose's start order.

podman-compose waits for ``service_healthy`` only on podman 4.6 and later
(it uses ``podman wait --condition=healthy``), and without systemd podman
runs no health check by itself. Debian 12's podman is 4.3, so here the
gating Docker Compose does is done by :meth:`ComposeStack.up`: services are
started one by one with ``podman-compose up -d --no-deps``, in the order
their ``depends_on`` demands, and each condition is checked as Docker checks
it: ``service_healthy`` by running the service's own health check at its
interval (failures during ``start_period`` do not count, ``retries`` failures
after it are fatal), ``service_completed_successfully`` by waiting for exit
code 0, ``service_started`` by the container running.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.podman import REPO_ROOT, Podman

PODMAN_COMPOSE = REPO_ROOT / ".tools" / "deploy" / "bin" / "podman-compose"
#: Docker's health check defaults, used where a service leaves one out.
DEFAULT_INTERVAL_S = 30.0
DEFAULT_RETRIES = 3
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def podman_compose_binary() -> Path:
    """The pinned podman-compose; fails (never skips) when it is not installed."""
    if not PODMAN_COMPOSE.exists():
        raise AssertionError(f"{PODMAN_COMPOSE} missing: run scripts/deploy-deps")
    return PODMAN_COMPOSE


def duration_s(value: str | None, default_s: float) -> float:
    """A Compose duration (``10s``, ``1m30s``, ``500ms``) in seconds."""
    if not value:
        return default_s
    parts = _DURATION.findall(str(value))
    if not parts:
        raise ValueError(f"not a Compose duration: {value!r}")
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


@dataclass(frozen=True)
class Dependency:
    """One ``depends_on`` entry."""

    service: str
    condition: str


@dataclass(frozen=True)
class HealthSettings:
    """When a health check runs and how many failures make a container unhealthy."""

    interval_s: float
    start_period_s: float
    retries: int


class StackError(AssertionError):
    """The stack did not come up; the message holds the failing service's logs."""


class ComposeStack:
    """``podman-compose -p PROJECT -f FILE...`` run from ``project_dir``."""

    def __init__(
        self, podman: Podman, project_dir: Path, files: Sequence[Path], project: str
    ) -> None:
        self.podman = podman
        self.project_dir = project_dir
        self.files = list(files)
        self.project = project
        self.binary = podman_compose_binary()
        #: The merged model of the services, once :meth:`up` read it.
        self.services: dict[str, Any] = {}

    def compose(
        self, *args: str, timeout_s: float = 300.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """``podman-compose ARGS`` with the podman settings of this machine."""
        command = [str(self.binary), "-p", self.project]
        for file in self.files:
            command += ["-f", str(file)]
        result = subprocess.run(
            [*command, *args],
            cwd=self.project_dir,
            env=self.podman.env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if check and result.returncode != 0:
            raise StackError(
                f"podman-compose {' '.join(args)} exited {result.returncode}:\n"
                f"{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
            )
        return result

    def config(self) -> dict[str, Any]:
        """The merged, interpolated model (services left out by profiles are absent)."""
        model = yaml.safe_load(self.compose("config", timeout_s=60).stdout)
        if not isinstance(model, dict) or not model.get("services"):
            raise StackError(f"podman-compose config gave no services: {model!r}")
        return model

    @staticmethod
    def dependencies(service: dict[str, Any]) -> list[Dependency]:
        """A service's ``depends_on``, in either of its two forms."""
        depends_on = service.get("depends_on") or {}
        if isinstance(depends_on, list):
            return [Dependency(name, "service_started") for name in depends_on]
        return [
            Dependency(name, (spec or {}).get("condition", "service_started"))
            for name, spec in depends_on.items()
        ]

    @classmethod
    def start_order(cls, services: dict[str, Any]) -> list[str]:
        """Services in an order where each comes after everything it depends on."""
        order: list[str] = []
        visiting: set[str] = set()

        def visit(name: str) -> None:
            if name in order:
                return
            if name in visiting:
                raise StackError(f"depends_on cycle through {name}")
            if name not in services:
                raise StackError(f"a service depends on {name}, which is not in the stack")
            visiting.add(name)
            for dependency in cls.dependencies(services[name]):
                visit(dependency.service)
            visiting.discard(name)
            order.append(name)

        for name in sorted(services):
            visit(name)
        return order

    def containers(self, service: str) -> list[str]:
        """Names of the service's containers (one per replica)."""
        listed = self.podman.run(
            "ps", "-a",
            "--filter", f"label=io.podman.compose.project={self.project}",
            "--filter", f"label=com.docker.compose.service={service}",
            "--format", "{{.Names}}",
        ).stdout.split()  # fmt: skip
        if not listed:
            raise StackError(f"no container for service {service}")
        return sorted(listed)

    def logs(self, service: str, lines: int = 60) -> str:
        """The last lines each of the service's containers printed."""
        parts = []
        for name in self.containers(service):
            result = self.podman.run("logs", "--tail", str(lines), name, check=False)
            parts.append(f"--- {name}\n{result.stdout}{result.stderr}")
        return "\n".join(parts)

    def state(self, container: str) -> dict[str, Any]:
        """``podman inspect``'s State of a container."""
        found = self.podman.run("inspect", container, "--format", "{{json .State}}").stdout
        state: dict[str, Any] = yaml.safe_load(found)
        return state

    def healthy(self, container: str) -> bool:
        """Run the container's health check once (podman records the result)."""
        return self.podman.run("healthcheck", "run", container, check=False).returncode == 0

    def health_settings(self, spec: dict[str, Any], container: str) -> HealthSettings:
        """The service's health check timing, or its image's when Compose sets none."""
        check = spec.get("healthcheck")
        if check:
            if check.get("disable"):
                raise StackError(f"{container}: service_healthy, but its health check is off")
            return HealthSettings(
                duration_s(check.get("interval"), DEFAULT_INTERVAL_S),
                duration_s(check.get("start_period"), 0.0),
                int(check.get("retries", DEFAULT_RETRIES)),
            )
        found = self.podman.run(
            "inspect", container, "--format", "{{json .Config.Healthcheck}}"
        ).stdout
        image = yaml.safe_load(found) or {}
        if not image.get("Test"):
            raise StackError(f"{container}: service_healthy, but it has no health check")
        return HealthSettings(
            image.get("Interval", 0) / 1e9 or DEFAULT_INTERVAL_S,
            image.get("StartPeriod", 0) / 1e9,
            int(image.get("Retries") or DEFAULT_RETRIES),
        )

    def started_at(self, container: str) -> float:
        """When the container last started, in seconds since the epoch."""
        found = self.podman.run("inspect", container, "--format", "{{.State.StartedAt.UnixNano}}")
        return int(found.stdout) / 1e9

    def wait_healthy(self, service: str, spec: dict[str, Any]) -> None:
        """Every replica passes its health check, probed as Docker probes it.

        The first probe comes one interval after the container started, the
        next ones an interval apart; failures inside the start period do not
        count, ``retries`` failures after it make the container unhealthy.
        """
        containers = self.containers(service)
        timing = self.health_settings(spec, containers[0])
        started = {name: self.started_at(name) for name in containers}
        next_probe = {name: started[name] + timing.interval_s for name in containers}
        failures = dict.fromkeys(containers, 0)
        while next_probe:
            name = min(next_probe, key=next_probe.__getitem__)
            time.sleep(max(0.0, next_probe[name] - time.time()))
            if self.state(name).get("Status") != "running":
                raise StackError(f"{name} stopped:\n{self.logs(service)}")
            if self.healthy(name):
                del next_probe[name]
                continue
            if time.time() - started[name] > timing.start_period_s:
                failures[name] += 1
            if failures[name] >= timing.retries:
                raise StackError(f"{name} is unhealthy:\n{self.logs(service)}")
            next_probe[name] = time.time() + timing.interval_s

    def wait_completed(self, service: str, timeout_s: float) -> None:
        """Each of the service's containers exits with code 0."""
        for container in self.containers(service):
            code = self.podman.run("wait", container, timeout_s=timeout_s).stdout.strip()
            if code != "0":
                raise StackError(f"{container} exited {code}:\n{self.logs(service)}")

    def wait_started(self, service: str) -> None:
        """Each of the service's containers is running (or ran)."""
        for container in self.containers(service):
            state = self.state(container)
            if state.get("Status") != "running" and state.get("ExitCode") != 0:
                raise StackError(f"{container} did not start:\n{self.logs(service)}")

    def up(self, timeout_s: float = 600.0) -> list[str]:
        """Start every service once its dependencies meet their conditions; the order used."""
        services = self.services = self.config()["services"]
        order = self.start_order(services)
        deadline = time.monotonic() + timeout_s
        satisfied: set[Dependency] = set()
        for name in order:
            for dependency in self.dependencies(services[name]):
                if dependency in satisfied:
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise StackError(f"the stack took over {timeout_s:.0f} s to reach {name}")
                if dependency.condition == "service_healthy":
                    self.wait_healthy(dependency.service, services[dependency.service])
                elif dependency.condition == "service_completed_successfully":
                    self.wait_completed(dependency.service, remaining)
                else:
                    self.wait_started(dependency.service)
                satisfied.add(dependency)
            self.compose("up", "-d", "--no-deps", name, timeout_s=max(60.0, remaining_s(deadline)))
        return order

    def stop(self, order: Sequence[str], timeout_s: float = 300.0) -> dict[str, int]:
        """Stop services one by one in ``order``; each container's exit code.

        Docker Compose stops dependents before what they depend on;
        ``podman-compose down`` stops every container at once, so workers
        would drain against a database already gone.
        """
        codes: dict[str, int] = {}
        for service in order:
            self.compose("stop", service, timeout_s=timeout_s)
            for container in self.containers(service):
                codes[container] = int(self.state(container).get("ExitCode", -1))
        return codes

    def down(self) -> subprocess.CompletedProcess[str]:
        """``podman-compose down -v``: containers, networks and volumes go."""
        return self.compose("down", "-v", "-t", "30", timeout_s=300, check=False)


def remaining_s(deadline: float) -> float:
    """Seconds left before ``deadline``."""
    return deadline - time.monotonic()
