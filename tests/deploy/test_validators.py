"""Every deployment file passes the validators that apply to it (shared CONTAINERS.md).

The validators live in .tools/deploy (scripts/deploy-deps) or are Debian
packages (promtool, shellcheck, nginx); a missing one fails the test with the
command that installs it. Each test also checks that it found files to
validate, so an emptied glob cannot pass.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.conftest import repo_path
from tests.deploy.nginx import Nginx
from tests.support.processes import free_port

TOOLS = repo_path(".tools", "deploy", "bin")
DEPLOY = repo_path("deploy")
OVERLAYS = ("dev", "staging", "prod")
#: Custom resources with no schema in kubernetes-validate's bundle; checked below.
CUSTOM_KINDS = {
    "ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor", "ExternalSecret",
}  # fmt: skip
#: Metric names forgeline exports (plus the standard process_* and up series).
METRICS = {
    "http_requests_total",
    "http_request_duration_seconds",
    "forgeline_jobs_submitted_total",
    "forgeline_jobs_finished_total",
    "forgeline_job_duration_seconds",
    "forgeline_queue_depth",
    "forgeline_jobs_running",
    "forgeline_backend_requests_total",
    "forgeline_backend_ttft_seconds",
    "forgeline_tokens_generated_total",
    "forgeline_stream_subscribers",
    "forgeline_ratelimit_rejections_total",
    "forgeline_db_pool_connections",
    "forgeline_db_pool_size",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
    "up",
}
#: forgeline's HTTP drain after SIGTERM (cli.HTTP_DRAIN_S) and default worker drain.
HTTP_DRAIN_S = 5
DEFAULT_DRAIN_TIMEOUT_S = 20


def tool(name: str) -> str:
    """A validator's path; fails with the fix when it is not installed."""
    local = TOOLS / name
    if local.exists():
        return str(local)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(f"{name} is not installed: run scripts/system-deps as root")
    return found


def run(*args: str | Path, timeout_s: float = 120) -> str:
    """Run a validator; fail the test with its output when it exits non-zero."""
    result = subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout_s, check=False
    )
    assert result.returncode == 0, f"{' '.join(map(str, args))}:\n{result.stdout}{result.stderr}"
    return result.stdout


def kustomize(path: Path) -> str:
    """The manifests of a kustomization, as kubectl renders them."""
    return run(tool("kubectl"), "kustomize", path)


def documents(text: str) -> list[dict[str, object]]:
    """The YAML documents of a multi-document stream."""
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each overlay rendered to a file of its own."""
    folder = tmp_path_factory.mktemp("k8s")
    paths = {}
    for overlay in OVERLAYS:
        path = folder / overlay / "manifests.yaml"
        path.parent.mkdir()
        path.write_text(kustomize(DEPLOY / "k8s" / "overlays" / overlay))
        paths[overlay] = path
    return paths


def test_hadolint_passes_every_dockerfile() -> None:
    """hadolint: deploy/Dockerfile and the local base images' Containerfiles."""
    files = [DEPLOY / "Dockerfile", *sorted(repo_path("tests", "deploy", "images").glob("*file"))]
    assert len(files) >= 3
    run(tool("hadolint"), *files)


def test_compose_files_match_the_compose_spec() -> None:
    """check-jsonschema with the Compose specification's schema."""
    files = [repo_path("compose.yaml"), repo_path("compose.prod.yaml")]
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", *files)


def test_workflows_match_the_github_schema_and_pin_actions_by_sha() -> None:
    """Workflows validate, every action is pinned to a full commit SHA, permissions are explicit."""
    files = sorted(repo_path(".github", "workflows").glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "deploy.yml"}
    run(tool("check-jsonschema"), "--builtin-schema", "vendor.github-workflows", *files)
    for path in files:
        text = path.read_text()
        for ref in re.findall(r"uses:\s*(\S+)", text):
            assert re.fullmatch(r"[\w.-]+/[\w./-]+@[0-9a-f]{40}", ref), f"{path.name}: {ref}"
        workflow = yaml.safe_load(text)
        assert workflow["permissions"] == {"contents": "read"}, path.name


def test_every_yaml_file_passes_yamllint() -> None:
    """yamllint over deploy/, the compose files and the workflows."""
    run(
        tool("yamllint"),
        "--strict",
        "-c",
        DEPLOY / "yamllint.yaml",
        DEPLOY,
        repo_path("compose.yaml"),
        repo_path("compose.prod.yaml"),
        repo_path(".github", "workflows"),
    )


def test_kubernetes_overlays_render_and_validate_strictly(rendered: dict[str, Path]) -> None:
    """kustomize renders base and overlays; kubernetes-validate --strict passes every object."""
    kustomize(DEPLOY / "k8s" / "base")
    for overlay, path in rendered.items():
        out = run(tool("kubernetes-validate"), "--strict", path)
        unvalidated = set(re.findall(r"Couldn't find schema for kind (\w+)", out))
        assert unvalidated <= CUSTOM_KINDS, (overlay, unvalidated)
        kinds = {doc["kind"] for doc in documents(path.read_text())}
        assert kinds >= {
            "Deployment", "Service", "Ingress", "HorizontalPodAutoscaler", "ScaledObject",
            "PodDisruptionBudget", "Job", "ConfigMap", "ServiceMonitor", "Namespace",
        }, overlay  # fmt: skip
        assert ("Secret" in kinds) != ("ExternalSecret" in kinds), overlay


def test_custom_resources_name_what_exists(rendered: dict[str, Path]) -> None:
    """The KEDA, Prometheus Operator and External Secrets objects point at real objects."""
    docs = documents(rendered["prod"].read_text())
    by_kind = {(d["kind"], d["metadata"]["name"]): d for d in docs}  # type: ignore[index]
    scaled = by_kind[("ScaledObject", "forgeline-worker")]
    assert ("Deployment", scaled["spec"]["scaleTargetRef"]["name"]) in by_kind  # type: ignore[index]
    auth_name = scaled["spec"]["triggers"][0]["authenticationRef"]["name"]  # type: ignore[index]
    assert ("TriggerAuthentication", auth_name) in by_kind
    query = scaled["spec"]["triggers"][0]["metadata"]["query"]  # type: ignore[index]
    assert "procrastinate_jobs" in query
    secret = by_kind[("ExternalSecret", "forgeline-secrets")]
    keys = {item["secretKey"] for item in secret["spec"]["data"]}  # type: ignore[index]
    assert {"FORGELINE_DATABASE_URL", "FORGELINE_SECRET_KEY", "FORGELINE_METRICS_TOKEN"} <= keys
    monitor = by_kind[("ServiceMonitor", "forgeline-api")]
    service = by_kind[("Service", "forgeline-api")]
    port_names = {p["name"] for p in service["spec"]["ports"]}  # type: ignore[index]
    assert monitor["spec"]["endpoints"][0]["port"] in port_names  # type: ignore[index]


def _pod_specs(path: Path) -> dict[str, dict[str, object]]:
    specs = {}
    for doc in documents(path.read_text()):
        if doc["kind"] in ("Deployment", "Job"):
            specs[doc["metadata"]["name"]] = doc["spec"]["template"]["spec"]  # type: ignore[index]
    return specs


def test_pods_are_restricted_and_grace_periods_cover_the_drain(
    rendered: dict[str, Path],
) -> None:
    """Non-root, read-only, no capabilities, RuntimeDefault seccomp; grace > preStop + drain."""
    for overlay, path in rendered.items():
        specs = _pod_specs(path)
        assert set(specs) == {"forgeline-api", "forgeline-worker", "forgeline-migrate"}
        config = next(
            d for d in documents(path.read_text()) if d["kind"] == "ConfigMap"
        )["data"]  # fmt: skip
        drain_s = float(config.get("FORGELINE_DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S))  # type: ignore[attr-defined]
        for name, spec in specs.items():
            pod = spec["securityContext"]
            assert pod["runAsNonRoot"] is True, (overlay, name)  # type: ignore[index]
            assert pod["seccompProfile"] == {"type": "RuntimeDefault"}  # type: ignore[index]
            assert spec["automountServiceAccountToken"] is False
            for container in spec["containers"]:  # type: ignore[attr-defined]
                sc = container["securityContext"]
                assert sc["readOnlyRootFilesystem"] is True, (overlay, name)
                assert sc["allowPrivilegeEscalation"] is False
                assert sc["capabilities"] == {"drop": ["ALL"]}
        api = specs["forgeline-api"]["containers"][0]  # type: ignore[index]
        pre_stop_s = api["lifecycle"]["preStop"]["sleep"]["seconds"]
        # Endpoints drop the pod during preStop, then the HTTP drain; 10 s spare.
        assert pre_stop_s + HTTP_DRAIN_S + 10 <= specs["forgeline-api"][
            "terminationGracePeriodSeconds"
        ]  # fmt: skip
        assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert api["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
        worker = specs["forgeline-worker"]["containers"][0]  # type: ignore[index]
        worker_env = {e["name"]: e.get("value") for e in worker["env"]}
        metrics_port = int(worker_env["FORGELINE_METRICS_PORT"])
        assert worker["ports"] == [
            {"name": "metrics", "containerPort": metrics_port, "protocol": "TCP"}
        ]
        assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        # The worker drains, then hands jobs back (a few seconds); 10 s spare.
        assert drain_s + 10 <= specs["forgeline-worker"]["terminationGracePeriodSeconds"]  # type: ignore[operator]


def test_cloud_run_services_fit_the_ten_second_grace_period() -> None:
    """Cloud Run YAML parses, takes only the values deploy.sh sets, and drains within 10 s."""
    script = (DEPLOY / "cloudrun" / "deploy.sh").read_text()
    for kind in ("api", "worker"):
        text = (DEPLOY / "cloudrun" / f"{kind}.yaml").read_text()
        for name in set(re.findall(r"\$\{([A-Z_]+)\}", text)):
            assert re.search(rf"\b{name}\b", script), f"{kind}.yaml uses ${{{name}}}"
        service = yaml.safe_load(text)
        container = service["spec"]["template"]["spec"]["containers"][0]
        assert container["args"] == [{"api": "api", "worker": "serve"}[kind]]
        env = {e["name"]: e.get("value") for e in container["env"]}
        drain_s = float(env.get("FORGELINE_DRAIN_TIMEOUT_S") or DEFAULT_DRAIN_TIMEOUT_S)
        # The worker drain runs alongside the HTTP drain; Cloud Run kills at 10 s.
        budget = HTTP_DRAIN_S if kind == "api" else max(HTTP_DRAIN_S, drain_s)
        assert budget + 2 <= 10, kind
        annotations = service["spec"]["template"]["metadata"]["annotations"]
        assert annotations["run.googleapis.com/startup-cpu-boost"] == "true"
        secrets = {e["name"] for e in container["env"] if "valueFrom" in e}
        assert {"FORGELINE_DATABASE_URL", "FORGELINE_SECRET_KEY"} <= secrets


def test_shell_scripts_pass_shellcheck() -> None:
    """shellcheck over the deploy script and the install scripts."""
    files = [
        DEPLOY / "cloudrun" / "deploy.sh",
        *sorted((DEPLOY / "backup").glob("*.sh")),
        DEPLOY / "nginx" / "switch-upstream.sh",
        *sorted(repo_path("tests", "deploy", "images").glob("*.sh")),
        repo_path("scripts", "deploy-deps"),
    ]
    assert len(files) >= 4
    run(tool("shellcheck"), *files)


def test_prometheus_config_and_rules_check_and_alert_tests_pass() -> None:
    """promtool: the scrape config, the rules, and the alert unit tests."""
    prometheus = DEPLOY / "prometheus"
    run(tool("promtool"), "check", "config", "--syntax-only", prometheus / "prometheus.yml")
    run(tool("promtool"), "check", "rules", prometheus / "alerts.yml")
    out = run(tool("promtool"), "test", "rules", prometheus / "alerts.test.yml")
    assert "SUCCESS" in out
    rules = yaml.safe_load((prometheus / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"] if "alert" in r}
    tested = set(re.findall(r"alertname: (\w+)", (prometheus / "alerts.test.yml").read_text()))
    assert alerts == tested, "every alert has a unit test"


def test_dashboard_queries_only_exported_metrics() -> None:
    """The Grafana dashboard is valid JSON on the provisioned data source, using known metrics."""
    grafana = DEPLOY / "grafana"
    source = yaml.safe_load(
        (grafana / "provisioning" / "datasources" / "prometheus.yaml").read_text()
    )
    uid = source["datasources"][0]["uid"]
    dashboard = json.loads((grafana / "dashboards" / "forgeline.json").read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if panel["datasource"]["uid"] == uid
    ]
    assert len(exprs) >= 15
    for expr in exprs:
        names = re.findall(r"\b((?:forgeline|http|process)_[a-z_]+)\b", expr)
        series = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
        assert series, expr
        assert series <= METRICS, (expr, series - METRICS)
    for alert_metric in ("forgeline_queue_depth", "forgeline_tokens_generated_total"):
        assert any(alert_metric in e for e in exprs)


def test_trivy_finds_no_serious_misconfiguration(rendered: dict[str, Path]) -> None:
    """trivy config: nothing HIGH or CRITICAL in deploy/ or in the rendered overlays."""
    trivy = tool("trivy")
    for target in (DEPLOY, *(path.parent for path in rendered.values())):
        run(trivy, "config", "--quiet", "--exit-code", "1", "--severity", "HIGH,CRITICAL", target)


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    """nginx -t on deploy/nginx/nginx.conf (with the test's ports and folders)."""
    nginx = Nginx(tmp_path, free_port(), free_port())
    try:
        nginx.start("127.0.0.1:9")  # runs `nginx -t` first; the upstream need not answer
    finally:
        nginx.stop()
