"""compose.prod.yaml brought up with podman-compose; a story job through nginx over TLS.

The production stack as written: two api and two worker replicas of the
forgeline image, migrate run first, PostgreSQL, Redis, nginx with the
committed configuration, and an S3-compatible server in MinIO's place, on
the file's own networks (nginx at its static address, services found by
name). No registry can be reached here, so PostgreSQL, Redis and nginx are
images built from Debian's packages and the S3 server is moto
(tests/deploy/images/); tests/deploy/compose.podman.yaml adapts only what
those stand-ins need. Prometheus and Grafana are left out (see that file).
"""

from __future__ import annotations

import secrets
import ssl
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from forgeline.pipelines.story import StoryInput, to_markdown
from tests.deploy.compose import ComposeStack, StackError, duration_s
from tests.deploy.conftest import RecordFigure, repo_path
from tests.deploy.nginx import self_signed_certificate
from tests.deploy.podman import BuildResult, Podman
from tests.support.processes import free_port
from tests.support.sse import Transcript, events_url, read_events

pytestmark = pytest.mark.slow

OVERRIDE = repo_path("tests", "deploy", "compose.podman.yaml")
#: The whole stack on a loaded two-core machine: image-cold containers,
#: health checks at their configured intervals, migrations.
STACK_UP_TIMEOUT_S = 600.0
READY_TIMEOUT_S = 180.0
JOB_TIMEOUT_S = 300.0
STORY = {"prompt": "a lighthouse keeper who collects lost sounds", "max_tokens": 64, "seed": 7}


@dataclass
class Stack:
    """A running stack and how to reach it."""

    compose: ComposeStack
    https_url: str
    http_port: int
    tls: ssl.SSLContext
    admin_key: str
    bucket: str
    order: list[str]
    up_s: float

    def client(self) -> httpx.Client:
        """A client of nginx over TLS, authenticated with the injected admin key."""
        return httpx.Client(
            base_url=self.https_url,
            verify=self.tls,
            headers={"Authorization": f"Bearer {self.admin_key}"},
            timeout=httpx.Timeout(15, read=120),
        )


def write_env(path: Path, values: dict[str, str]) -> None:
    """.env.example with every variable it names set from ``values``; fails on a stray key."""
    lines, unused = [], dict(values)
    for line in repo_path(".env.example").read_text().splitlines():
        name = line.split("=", 1)[0]
        if not line.startswith("#") and "=" in line and name in values:
            line = f"{name}={unused.pop(name)}"
        lines.append(line)
    if unused:
        raise AssertionError(f".env.example no longer names {sorted(unused)}")
    path.write_text("\n".join(lines) + "\n")


def wait_ready(url: str, tls: ssl.SSLContext, timeout_s: float, stack: ComposeStack) -> None:
    """Poll ``/readyz`` through nginx until it answers 200, within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{url}/readyz", verify=tls, timeout=5)
            if answer.status_code == 200:
                return
            last = f"{answer.status_code} {answer.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise AssertionError(
        f"/readyz through nginx not 200 after {timeout_s:.0f} s: {last}\n"
        f"{stack.logs('nginx')}\n{stack.logs('api')}"
    )


@pytest.fixture
def stack(podman: Podman, forgeline_image: BuildResult, tmp_path: Path) -> Iterator[Stack]:
    """compose.prod.yaml up (and always down -v afterwards) with local images."""
    images = {
        "POSTGRES_IMAGE": podman.ensure_server_image("postgres"),
        "REDIS_IMAGE": podman.ensure_server_image("redis"),
        "NGINX_IMAGE": podman.ensure_server_image("nginx"),
        "MINIO_IMAGE": podman.ensure_server_image("s3"),
        "MINIO_CLIENT_IMAGE": podman.ensure_server_image("s3"),
    }
    # The project folder holds .env (compose.prod.yaml's env_file) beside the
    # compose file; deploy/ is the repository's, for nginx's mounts.
    project_dir = tmp_path / "project"
    project_dir.mkdir()
    (project_dir / "compose.prod.yaml").symlink_to(repo_path("compose.prod.yaml"))
    (project_dir / "deploy").symlink_to(repo_path("deploy"))
    cert, _ = self_signed_certificate(tmp_path / "tls")
    http_port, https_port = free_port(), free_port()
    admin_key = f"fl_{secrets.token_hex(4)}_{secrets.token_urlsafe(32)}"
    bucket = "forgeline-artifacts"
    write_env(
        project_dir / ".env",
        {
            "FORGELINE_IMAGE": forgeline_image.tag,
            "POSTGRES_PASSWORD": secrets.token_urlsafe(24),
            "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(24),
            "S3_BUCKET": bucket,
            # Published on the loopback only.
            "HTTP_PORT": f"127.0.0.1:{http_port}",
            "HTTPS_PORT": f"127.0.0.1:{https_port}",
            "TLS_DIR": str(cert.parent),
            "GRAFANA_ADMIN_PASSWORD": secrets.token_urlsafe(24),
            "FORGELINE_SECRET_KEY": secrets.token_urlsafe(48),
            "FORGELINE_ADMIN_KEY": admin_key,
            "FORGELINE_METRICS_TOKEN": secrets.token_urlsafe(24),
            **images,
        },
    )
    compose = ComposeStack(
        podman,
        project_dir,
        [project_dir / "compose.prod.yaml", OVERRIDE],
        project=f"fltest{uuid.uuid4().hex[:6]}",
    )
    tls = ssl.create_default_context(cafile=cert)
    https_url = f"https://127.0.0.1:{https_port}"
    try:
        started = time.monotonic()
        order = compose.up(timeout_s=STACK_UP_TIMEOUT_S)
        wait_ready(https_url, tls, READY_TIMEOUT_S, compose)
        up_s = time.monotonic() - started
        yield Stack(compose, https_url, http_port, tls, admin_key, bucket, order, up_s)
    finally:
        down = compose.down()
        left = podman.run(
            "ps", "-a", "--filter", f"label=io.podman.compose.project={compose.project}",
            "--format", "{{.Names}}",
        ).stdout.split()  # fmt: skip
        if left:
            podman.run("rm", "-f", "-t", "0", *left, check=False)
        volumes = [
            name
            for name in podman.run("volume", "ls", "--format", "{{.Name}}").stdout.split()
            if name.startswith(f"{compose.project}_")
        ]
        if volumes:
            podman.run("volume", "rm", "-f", *volumes, check=False)
        assert not left, f"down -v left {left}"
        assert not volumes, f"down -v left {volumes}"
        assert down.returncode == 0, down.stderr[-2000:]


def test_prod_stack_comes_up_and_streams_a_story_through_nginx(
    stack: Stack, record_figure: RecordFigure
) -> None:
    """compose.prod.yaml: migrate first, all healthy; a story streams over TLS and lands in S3."""
    record_figure("stack_up_s", stack.up_s)
    # Docker Compose's order: the database, then migrate, before any forgeline server.
    order = stack.order
    assert order.index("postgres") < order.index("migrate") < order.index("api")
    assert order.index("migrate") < order.index("worker")
    assert order.index("minio") < order.index("minio-setup") < order.index("api")
    assert order.index("api") < order.index("nginx")
    assert len(stack.compose.containers("api")) == 2
    assert len(stack.compose.containers("worker")) == 2
    # Every long-running service becomes healthy by its own check (nginx's
    # and the workers' too, which nothing waits for); else StackError.
    for service in ("postgres", "redis", "minio", "api", "worker", "nginx"):
        stack.compose.wait_healthy(service, stack.compose.services[service])
    api = stack.compose.state(stack.compose.containers("api")[0])
    assert api["Status"] == "running"

    with stack.client() as client:
        pipelines = client.get("/api/v1/pipelines")
        assert pipelines.status_code == 200, pipelines.text
        assert "story" in {p["name"] for p in pipelines.json()["items"]}

        created = client.post("/api/v1/jobs", json={"pipeline": "story", "input": STORY})
        assert created.status_code == 201, created.text
        assert created.headers["strict-transport-security"].startswith("max-age=")
        job_id = created.json()["id"]

        transcript = Transcript()
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while transcript.final is None and time.monotonic() < deadline:
            transcript.connections += 1
            for event in read_events(
                client, events_url("", job_id), last_event_id=transcript.last_seq or None
            ):
                if event.seq is not None:
                    transcript.add(event)
        assert transcript.final is not None, transcript.events[-5:]
        assert transcript.final.data["status"] == "succeeded", transcript.final.data
        assert transcript.of_type("token"), "no token was streamed"

        job = client.get(f"/api/v1/jobs/{job_id}").json()
        assert job["status"] == "succeeded"
        text = job["result"]["text"]
        assert text
        assert transcript.text() == text

        # The artifact, through nginx and straight from the S3 server.
        expected = to_markdown(StoryInput.model_validate(STORY), text).encode()
        download = client.get(f"/api/v1/jobs/{job_id}/artifacts/story.md")
        assert download.status_code == 200, download.text
        assert download.content == expected
    minio = stack.compose.containers("minio")[0]
    stored = stack.compose.podman.run(
        "exec", minio, "python", "/opt/s3/s3-tool.py", "cat", "http://127.0.0.1:9000",
        stack.bucket, f"artifacts/jobs/{job_id}/story.md",
    )  # fmt: skip
    assert stored.stdout.encode() == expected

    # Plain HTTP only redirects to HTTPS.
    plain = httpx.get(f"http://127.0.0.1:{stack.http_port}/api/v1/pipelines", timeout=10)
    assert plain.status_code == 301
    assert plain.headers["location"] == "https://127.0.0.1/api/v1/pipelines"

    # Stopped as Docker Compose stops it, dependents first: every forgeline
    # process drains within its stop_grace_period and exits 0.
    started = time.monotonic()
    codes = stack.compose.stop(list(reversed(order)))
    record_figure("stack_stop_s", time.monotonic() - started)
    forgeline = [*stack.compose.containers("api"), *stack.compose.containers("worker")]
    assert [codes[name] for name in forgeline] == [0, 0, 0, 0], codes


def test_start_order_follows_depends_on() -> None:
    """The gating order puts every service after what it depends on, and finds cycles."""
    services = {
        "api": {"depends_on": {"migrate": {"condition": "service_completed_successfully"}}},
        "migrate": {"depends_on": {"postgres": {"condition": "service_healthy"}}},
        "postgres": {},
        "nginx": {"depends_on": ["api"]},
    }
    assert ComposeStack.start_order(services) == ["postgres", "migrate", "api", "nginx"]
    with pytest.raises(StackError, match="cycle"):
        ComposeStack.start_order({"a": {"depends_on": ["b"]}, "b": {"depends_on": ["a"]}})


def test_compose_durations_are_read_as_docker_reads_them() -> None:
    """Health check timings: 10s, 1m30s, 500ms; a default when unset; garbage refused."""
    assert duration_s("10s", 30.0) == 10.0
    assert duration_s("1m30s", 30.0) == 90.0
    assert duration_s("500ms", 30.0) == 0.5
    assert duration_s(None, 30.0) == 30.0
    with pytest.raises(ValueError, match="not a Compose duration"):
        duration_s("soon", 30.0)
