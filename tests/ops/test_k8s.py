"""The Kubernetes manifests (ops/k8s) are checked offline: rendered by tests/ops/kustomize.py
(and compared with `kubectl kustomize` where kubectl exists), validated against the Kubernetes
JSON schemas that the kubernetes-validate package ships, and checked for what running the
platform needs: the right commands, probes on the admin port, a grace period above the drain
deadline, a PodDisruptionBudget per Deployment, resources, a non-root and read-only security
context, and every credential from a Secret. Each property is also broken on purpose once, to
show the check sees it. Finally the relay and the worker run on this test's services with the
environment and command their pods would get, and answer their own probes."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes_validate
import pytest
import yaml

from delivery.cli.parser import build_parser
from delivery.settings import ENV_PREFIX, Settings
from delivery.testing.env import IN_CI, environment_without_settings
from delivery.testing.processes import free_port
from delivery.testing.waits import wait_until
from tests.ops.kustomize import load_documents, render

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "ops" / "k8s"
OVERLAY = K8S / "overlays" / "production"
EXAMPLE_SECRET = K8S / "secret.example.yaml"
API_COMPONENT_LINES = "# components:\n#   - ../../components/api\n"

# The oldest Kubernetes release the manifests are meant for, and the newest the package knows.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.utils.latest_version())
UID = 10001
# Variables of the contract that the branches of #12 and #14 add to Settings; until those land,
# Settings ignores them (extra="ignore"), so they are allowed here by name.
PENDING_SETTINGS = {
    "DELIVERY_ADMIN_HOST",
    "DELIVERY_ALLOW_PRIVATE_TARGETS",
    "DELIVERY_API_HOST",
    "DELIVERY_API_PORT",
    "DELIVERY_SECRETS_KEY",
}
SENSITIVE = ("URL", "KEY", "SECRET", "PASSWORD", "TOKEN")
PROBE_TIMEOUT_S = 60.0


# -- rendering ------------------------------------------------------------------------------


def with_api(tmp: Path) -> Path:
    """A copy of ops/k8s whose production overlay enables the API component, exactly as its
    comment says to once `delivery api` ships; returns the copied overlay."""
    copied = tmp / "k8s"
    shutil.copytree(K8S, copied)
    overlay = copied / "overlays" / "production" / "kustomization.yaml"
    text = overlay.read_text()
    assert API_COMPONENT_LINES in text, "the overlay no longer says how to enable the API"
    overlay.write_text(text.replace(API_COMPONENT_LINES, API_COMPONENT_LINES.replace("# ", "")))
    return overlay.parent


@pytest.fixture(scope="module")
def production() -> list[dict[str, Any]]:
    return render(OVERLAY)


@pytest.fixture(scope="module")
def production_with_api(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return render(with_api(tmp_path_factory.mktemp("api")))


def _key(obj: dict[str, Any]) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


@pytest.mark.parametrize("which", ["base", "production", "production-with-api"])
def test_the_renderer_agrees_with_kubectl_kustomize(which: str, tmp_path: Path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        # The machine image ships Debian's kubectl; CI never skips this cross-check.
        missing = "kubectl not on PATH: the renderer's output is not cross-checked here"
        if IN_CI:
            pytest.fail(missing)
        pytest.skip(missing)
    if which == "production-with-api":
        directory = with_api(tmp_path)
    else:
        directory = K8S / "base" if which == "base" else OVERLAY
    printed = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=True
    ).stdout
    theirs = {_key(o): o for o in yaml.safe_load_all(printed) if o}
    ours = {_key(o): o for o in render(directory)}
    assert sorted(ours) == sorted(theirs)
    for key, obj in ours.items():
        assert obj == theirs[key], f"{key} differs from kubectl kustomize"


# -- schema validation ----------------------------------------------------------------------


def _schema_errors(manifests: list[dict[str, Any]]) -> list[str]:
    errors = []
    for obj in manifests:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                where = ".".join(str(p) for p in exc.path)
                errors.append(f"{_key(obj)} on {version}: {where}: {exc.message}")
    return errors


def test_every_rendered_manifest_and_the_example_secret_match_the_kubernetes_schemas(
    production_with_api: list[dict[str, Any]],
):
    manifests = [*production_with_api, *load_documents(EXAMPLE_SECRET)]
    assert {o["kind"] for o in manifests} >= {
        "Deployment",
        "Job",
        "PodDisruptionBudget",
        "ConfigMap",
        "Service",
        "Secret",
    }
    assert _schema_errors(manifests) == []


def test_schema_validation_refuses_a_misspelt_field(production: list[dict[str, Any]]):
    broken = copy.deepcopy(production)
    container = _deployment(broken, "worker")["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    assert any("readinesProbe" in e for e in _schema_errors(broken))


# -- what the platform needs of its pods ----------------------------------------------------


def _deployment(manifests: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (found,) = [o for o in manifests if o["kind"] == "Deployment" and _role(o) == role]
    return found


def _role(obj: dict[str, Any]) -> str:
    return str(obj["metadata"]["labels"].get("app.kubernetes.io/component", ""))


def _named(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any] | None:
    found = [o for o in manifests if o["kind"] == kind and o["metadata"]["name"] == name]
    return found[0] if found else None


def _workloads(manifests: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    return (o for o in manifests if o["kind"] in ("Deployment", "Job"))


def _env(manifests: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, Any]:
    """The container's environment: literal strings, and ``{"secret": (name, key, optional)}``
    for a Secret reference. A ConfigMap it names must be among the manifests."""
    env: dict[str, Any] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        config = _named(manifests, "ConfigMap", name)
        assert config is not None, f"envFrom names ConfigMap {name}, which is not rendered"
        env.update(config.get("data", {}))
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            ref = item["valueFrom"]["secretKeyRef"]
            env[item["name"]] = {"secret": (ref["name"], ref["key"], ref.get("optional", False))}
    return env


def _setting_default(name: str) -> Any:
    return Settings.model_fields[name].default


def _quantity(value: str | int | float) -> float:
    text = str(value)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if text.endswith(suffix):
            return float(text[: -len(suffix)]) * factor
    return float(text)


def _port(container: dict[str, Any], port: str | int) -> int | None:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in container.get("ports", []) if p.get("name") == port]
    return named[0] if named else None


def _secret_keys() -> set[tuple[str, str]]:
    return {
        (s["metadata"]["name"], key)
        for s in load_documents(EXAMPLE_SECRET)
        for key in s.get("stringData", {})
    }


def problems(manifests: list[dict[str, Any]]) -> list[str]:
    """Every property the platform needs that the manifests break, one line each."""
    found: list[str] = []
    roles = {_role(o) for o in manifests if o["kind"] == "Deployment"}
    if not {"relay", "worker"} <= roles:
        found.append(f"Deployments for relay and worker expected, found {sorted(roles)}")
    if not any(o["kind"] == "Job" and _role(o) == "migrate" for o in manifests):
        found.append("no migrate Job")
    for workload in _workloads(manifests):
        found.extend(
            f"{workload['kind']}/{workload['metadata']['name']}: {p}"
            for p in _workload_problems(manifests, workload)
        )
    for config in (o for o in manifests if o["kind"] == "ConfigMap"):
        for name in config.get("data", {}):
            if any(word in name for word in SENSITIVE):
                found.append(f"ConfigMap/{config['metadata']['name']}: {name} belongs in a Secret")
    return found


def _workload_problems(manifests: list[dict[str, Any]], workload: dict[str, Any]) -> Iterator[str]:
    pod = workload["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    yield from _security_problems(pod, container)
    yield from _resource_problems(container)
    yield from _command_problems(workload, container)
    env = _env(manifests, container)
    yield from _env_problems(workload, env)
    if workload["kind"] == "Job":
        if pod.get("restartPolicy") not in ("Never", "OnFailure"):
            yield "a Job's pods restart Never or OnFailure"
        return
    yield from _deployment_problems(manifests, workload, container, env)


def _security_problems(pod: dict[str, Any], container: dict[str, Any]) -> Iterator[str]:
    if pod.get("automountServiceAccountToken") is not False:
        yield "automountServiceAccountToken must be false (the processes never call the API)"
    pod_security = pod.get("securityContext", {})
    if pod_security.get("runAsNonRoot") is not True:
        yield "the pod must set runAsNonRoot: true"
    security = container.get("securityContext", {})
    if security.get("runAsUser", pod_security.get("runAsUser")) != UID:
        yield f"runAsUser must be {UID}, the image's numeric user"
    if security.get("allowPrivilegeEscalation") is not False:
        yield "allowPrivilegeEscalation must be false"
    if security.get("privileged"):
        yield "privileged"
    if security.get("readOnlyRootFilesystem") is not True:
        yield "readOnlyRootFilesystem must be true"
    capabilities = security.get("capabilities", {})
    if "ALL" not in capabilities.get("drop", []) or capabilities.get("add"):
        yield "capabilities must drop ALL and add none"


def _resource_problems(container: dict[str, Any]) -> Iterator[str]:
    resources = container.get("resources", {})
    for kind in ("cpu", "memory"):
        request = resources.get("requests", {}).get(kind)
        limit = resources.get("limits", {}).get(kind)
        if request is None or limit is None:
            yield f"{kind} request and limit expected"
        elif _quantity(limit) < _quantity(request):
            yield f"{kind} limit {limit} below its request {request}"


def _command_problems(workload: dict[str, Any], container: dict[str, Any]) -> Iterator[str]:
    image = container["image"]
    tagged = ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    if not (tagged or "@" in image):
        yield f"image {image} is not pinned to a release or digest"
    if container.get("command") != ["delivery"] or not container.get("args"):
        yield "command must be [delivery] with the subcommand in args"
        return
    expected = "migrate" if workload["kind"] == "Job" else _role(workload)
    if container["args"][0] != expected:
        yield f"runs `delivery {' '.join(container['args'])}`, expected `delivery {expected}`"
    try:
        build_parser().parse_args(container["args"])
    except SystemExit:
        yield f"`delivery {' '.join(container['args'])}` does not parse"


def _env_problems(workload: dict[str, Any], env: dict[str, Any]) -> Iterator[str]:
    required = ["DELIVERY_DATABASE_URL"]
    if workload["kind"] != "Job":
        required.append("DELIVERY_AMQP_URL")
    for name in required:
        if not isinstance(env.get(name), dict):
            yield f"{name} must come from a Secret (secretKeyRef)"
    secrets = _secret_keys()
    for name, value in env.items():
        if not isinstance(value, dict):
            if any(word in name for word in SENSITIVE):
                yield f"{name} is a literal; credentials come from a Secret"
            continue
        secret, key, optional = value["secret"]
        if not optional and (secret, key) not in secrets:
            yield f"{name}: Secret {secret} key {key} is not in {EXAMPLE_SECRET.name}"
    known = {
        field.alias or ENV_PREFIX + name.upper() for name, field in Settings.model_fields.items()
    }
    unknown = {n for n in env if n.startswith(ENV_PREFIX)} - known - PENDING_SETTINGS
    if unknown:
        yield f"not settings: {sorted(unknown)}"


def _deployment_problems(
    manifests: list[dict[str, Any]],
    deployment: dict[str, Any],
    container: dict[str, Any],
    env: dict[str, Any],
) -> Iterator[str]:
    pod = deployment["spec"]["template"]["spec"]
    if env.get("DELIVERY_ADMIN_HOST") != "0.0.0.0":
        yield "DELIVERY_ADMIN_HOST must be 0.0.0.0: the kubelet probes the pod's IP"
    admin_port = int(env.get("DELIVERY_ADMIN_PORT", _setting_default("admin_port")))
    if admin_port == 0:
        yield "the admin port is off: no probes, no metrics"
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = container.get(probe, {}).get("httpGet")
        if get is None:
            yield f"no {probe}"
            continue
        if get.get("path") != path:
            yield f"{probe} must GET {path}, not {get.get('path')}"
        if _port(container, get.get("port", "")) != admin_port:
            yield f"{probe} port {get.get('port')} is not the admin port {admin_port}"
    shutdown_s = float(
        env.get("DELIVERY_SHUTDOWN_TIMEOUT_S", _setting_default("shutdown_timeout_s"))
    )
    grace_s = pod.get("terminationGracePeriodSeconds", 30)
    if not grace_s > shutdown_s:
        yield (
            f"terminationGracePeriodSeconds {grace_s} must exceed "
            f"DELIVERY_SHUTDOWN_TIMEOUT_S {shutdown_s:g}"
        )
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    budgets = [
        o
        for o in manifests
        if o["kind"] == "PodDisruptionBudget"
        and o["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ]
    if len(budgets) != 1:
        yield f"{len(budgets)} PodDisruptionBudgets select its pods, expected 1"
    elif not _allows_a_disruption(budgets[0]["spec"], deployment["spec"].get("replicas", 1)):
        yield "its PodDisruptionBudget allows no voluntary disruption (a drain would hang)"


def _allows_a_disruption(budget: dict[str, Any], replicas: int) -> bool:
    if "maxUnavailable" in budget:
        return budget["maxUnavailable"] not in (0, "0%")
    minimum = budget.get("minAvailable", 0)
    if isinstance(minimum, str):
        return minimum != "100%"
    return bool(minimum < replicas)


def test_the_production_overlay_holds_every_property(production: list[dict[str, Any]]):
    assert problems(production) == []
    assert {_role(o) for o in production if o["kind"] == "Deployment"} == {"relay", "worker"}


def test_with_the_api_enabled_it_holds_every_property_too(
    production_with_api: list[dict[str, Any]],
):
    assert problems(production_with_api) == []
    api = _deployment(production_with_api, "api")
    service = _named(production_with_api, "Service", "delivery-api")
    assert service is not None
    assert (
        service["spec"]["selector"].items() <= api["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_runbook_links_of_the_alerts_reach_the_admin_port_of_every_role(
    production: list[dict[str, Any]],
):
    """Every alert's runbook_url names http://delivery-admin:9600/runbooks/...; that name is a
    Service on the admin port of the relay and worker pods, which serve the runbooks."""
    base = re.search(r"runbook base URL: (\S+)", (ROOT / "ops/prometheus/alerts.yml").read_text())
    assert base is not None
    host, port = base.group(1).split("/")[2].split(":")
    service = _named(production, "Service", host)
    assert service is not None, f"no Service named {host}"
    (admin_port,) = service["spec"]["ports"]
    assert admin_port["port"] == int(port)
    for role in ("relay", "worker"):
        workload = _deployment(production, role)
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), role
        (container,) = workload["spec"]["template"]["spec"]["containers"]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert admin_port["targetPort"] in ports, role


def test_the_example_secret_holds_placeholders_only():
    (secret,) = load_documents(EXAMPLE_SECRET)
    assert (
        secret["metadata"]["namespace"]
        == yaml.safe_load((OVERLAY / "kustomization.yaml").read_text())["namespace"]
    )
    for key, value in secret["stringData"].items():
        assert "CHANGE_ME" in value, f"{key}: an example Secret holds placeholders, never values"
    assert secret["stringData"]["amqp-url"].count("amqp://") == 3, "every node of the cluster"


def _container(manifests: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (container,) = _deployment(manifests, role)["spec"]["template"]["spec"]["containers"]
    return container


def _pod(manifests: list[dict[str, Any]], role: str) -> dict[str, Any]:
    return _deployment(manifests, role)["spec"]["template"]["spec"]


def _config(manifests: list[dict[str, Any]]) -> dict[str, str]:
    config = _named(manifests, "ConfigMap", "delivery-config")
    assert config is not None
    return config["data"]


def _job_container(manifests: list[dict[str, Any]]) -> dict[str, Any]:
    (job,) = [o for o in manifests if o["kind"] == "Job"]
    return job["spec"]["template"]["spec"]["containers"][0]


def _budget(manifests: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (budget,) = [o for o in manifests if o["kind"] == "PodDisruptionBudget" and _role(o) == role]
    return budget


Breakage = Callable[[list[dict[str, Any]]], None]
BREAKAGES: dict[str, tuple[Breakage, str]] = {
    "grace period at the drain deadline": (
        lambda m: _pod(m, "worker").update(terminationGracePeriodSeconds=30),
        "must exceed DELIVERY_SHUTDOWN_TIMEOUT_S",
    ),
    "drain deadline raised past the grace period": (
        lambda m: _config(m).update(DELIVERY_SHUTDOWN_TIMEOUT_S="60"),
        "must exceed DELIVERY_SHUTDOWN_TIMEOUT_S 60",
    ),
    "no readiness probe": (
        lambda m: _container(m, "relay").pop("readinessProbe"),
        "no readinessProbe",
    ),
    "liveness on /readyz": (
        lambda m: _container(m, "worker")["livenessProbe"]["httpGet"].update(path="/readyz"),
        "livenessProbe must GET /healthz",
    ),
    "probe on another port": (
        lambda m: _config(m).update(DELIVERY_ADMIN_PORT="9700"),
        "is not the admin port 9700",
    ),
    "admin server on loopback": (
        lambda m: _config(m).update(DELIVERY_ADMIN_HOST="127.0.0.1"),
        "DELIVERY_ADMIN_HOST must be 0.0.0.0",
    ),
    "runs as root": (
        lambda m: _pod(m, "relay")["securityContext"].update(runAsUser=0),
        "runAsUser must be",
    ),
    "runAsNonRoot dropped": (
        lambda m: _pod(m, "relay")["securityContext"].pop("runAsNonRoot"),
        "runAsNonRoot",
    ),
    "writable root filesystem": (
        lambda m: _job_container(m)["securityContext"].update(readOnlyRootFilesystem=False),
        "readOnlyRootFilesystem",
    ),
    "privilege escalation": (
        lambda m: _container(m, "worker")["securityContext"].pop("allowPrivilegeEscalation"),
        "allowPrivilegeEscalation",
    ),
    "a capability added": (
        lambda m: _container(m, "worker")["securityContext"]["capabilities"].update(
            add=["NET_ADMIN"]
        ),
        "capabilities must drop ALL",
    ),
    "no memory limit": (
        lambda m: _container(m, "worker")["resources"]["limits"].pop("memory"),
        "memory request and limit expected",
    ),
    "no PodDisruptionBudget": (
        lambda m: m.remove(_budget(m, "worker")),
        "0 PodDisruptionBudgets select its pods",
    ),
    "a PodDisruptionBudget that blocks every drain": (
        lambda m: _budget(m, "relay").update(
            spec={**_budget(m, "relay")["spec"], "minAvailable": 2, "maxUnavailable": 0}
        ),
        "allows no voluntary disruption",
    ),
    "database URL as a literal": (
        lambda m: _container(m, "relay")["env"].__setitem__(
            0, {"name": "DELIVERY_DATABASE_URL", "value": "postgresql://u:p@db/delivery"}
        ),
        "DELIVERY_DATABASE_URL must come from a Secret",
    ),
    "a Secret key nobody creates": (
        lambda m: _job_container(m)["env"][0]["valueFrom"]["secretKeyRef"].update(key="db"),
        "key db is not in secret.example.yaml",
    ),
    "a credential in the ConfigMap": (
        lambda m: _config(m).update(DELIVERY_AMQP_URL="amqp://guest:guest@rabbit/"),
        "belongs in a Secret",
    ),
    "a misspelt setting": (
        lambda m: _config(m).update(DELIVERY_SHUTDOWN_TIMEOUT="30"),
        "not settings",
    ),
    "the wrong command": (
        lambda m: _container(m, "worker").update(args=["run"]),
        "expected `delivery worker`",
    ),
    "a command the CLI does not have": (
        lambda m: _job_container(m).update(args=["migrate", "--everything"]),
        "does not parse",
    ),
    "an unpinned image": (
        lambda m: _container(m, "relay").update(image="registry.example.com/delivery:latest"),
        "is not pinned",
    ),
    "no migrate Job": (
        lambda m: m.remove(next(o for o in m if o["kind"] == "Job")),
        "no migrate Job",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_check_sees_its_property_broken(breakage: str, production: list[dict[str, Any]]):
    broken = copy.deepcopy(production)
    mutate, expected = BREAKAGES[breakage]
    mutate(broken)
    found = problems(broken)
    assert any(expected in p for p in found), found


# -- the rollout procedure ------------------------------------------------------------------

ROLLOUT = ROOT / "runbooks" / "rolling-upgrade.md"
_SET_SELECTOR = re.compile(r"-l '([\w./-]+) in \(([\w,-]+)\)'")


def test_the_rollout_procedure_names_what_the_overlay_renders(production: list[dict[str, Any]]):
    """runbooks/rolling-upgrade.md applies the config and the migrate Job first, by label, then
    the rest: its selector must pick exactly those, and every object it names must exist."""
    text = ROLLOUT.read_text()
    (selector,) = _SET_SELECTOR.findall(text)
    label, values = selector[0], set(selector[1].split(","))
    first = {
        (o["kind"], o["metadata"]["name"])
        for o in production
        if o["metadata"].get("labels", {}).get(label) in values
    }
    assert first == {("ConfigMap", "delivery-config"), ("Job", "delivery-migrate")}
    for path in re.findall(r"apply -k (\S+)", text):
        assert (ROOT / path / "kustomization.yaml").is_file(), path
    named = re.findall(r"\b(job|deployment)/([a-z-]+)", text)
    assert {kind for kind, _ in named} == {"job", "deployment"}
    rendered = {(o["kind"].lower(), o["metadata"]["name"]) for o in production}
    for kind, name in named:
        assert (kind, name) in rendered, (
            f"{ROLLOUT.name} names {kind}/{name}, which is not rendered"
        )
    assert set(re.findall(r"-n (\S+)", text)) == {production[0]["metadata"]["namespace"]}


# -- the pods' processes, run here ----------------------------------------------------------


def test_every_pod_environment_loads_with_the_real_settings(
    production_with_api: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch
):
    secrets = {
        (s["metadata"]["name"], key): value
        for s in load_documents(EXAMPLE_SECRET)
        for key, value in s["stringData"].items()
    }
    for workload in _workloads(production_with_api):
        env = _env(production_with_api, workload["spec"]["template"]["spec"]["containers"][0])
        for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(name)
        for name, value in env.items():
            if not isinstance(value, dict):
                monkeypatch.setenv(name, value)
                continue
            secret, key, optional = value["secret"]
            if (secret, key) in secrets:
                monkeypatch.setenv(name, secrets[(secret, key)])
            else:
                assert optional, f"{name}: {secret}/{key} is in no Secret"
        settings = Settings()
        assert settings.admin_port == int(env.get("DELIVERY_ADMIN_PORT", 9600))


async def _answers(http: aiohttp.ClientSession, url: str, proc: asyncio.subprocess.Process) -> bool:
    if proc.returncode is not None:
        assert proc.stderr is not None
        error = (await proc.stderr.read()).decode()[-2000:]
        raise AssertionError(f"exited {proc.returncode} before {url} answered: {error}")
    try:
        async with http.get(url) as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


@pytest.mark.integration
@pytest.mark.parametrize("role", ["relay", "worker", "api"])
async def test_the_pod_command_runs_and_answers_its_probes(
    role: str, request: pytest.FixtureRequest, settings: Settings
):
    """The container's command with the pod's environment, on this test's services: it
    becomes live and ready on the probes' paths, and SIGTERM ends it with 0 well within the
    pod's grace period."""
    production = request.getfixturevalue("production_with_api" if role == "api" else "production")
    deployment = _deployment(production, role)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    port = free_port()
    env = environment_without_settings()
    for name, value in _env(production, container).items():
        if not isinstance(value, dict):
            env[name] = value
    env.update(
        DELIVERY_DATABASE_URL=settings.database_url,
        DELIVERY_AMQP_URL=settings.amqp_url,
        DELIVERY_AMQP_PREFIX=settings.amqp_prefix,
        # The kubelet probes the pod's IP; here the probe comes from loopback.
        DELIVERY_ADMIN_HOST="127.0.0.1",
        DELIVERY_ADMIN_PORT=str(port),
    )
    if role == "api":  # its own port too, free here (the pod's 8080 may be taken)
        env.update(DELIVERY_API_HOST="127.0.0.1", DELIVERY_API_PORT=str(free_port()))
    assert container["command"] == ["delivery"]
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "delivery",
        *container["args"],
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
            for probe in ("livenessProbe", "readinessProbe"):
                url = f"http://127.0.0.1:{port}{container[probe]['httpGet']['path']}"
                await wait_until(
                    lambda u=url: _answers(http, u, proc),
                    timeout_s=PROBE_TIMEOUT_S,
                    what=f"{role}'s {probe} ({url}) to answer 200",
                )
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(proc.wait(), pod["terminationGracePeriodSeconds"])
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.stderr is not None
    assert code == 0, (await proc.stderr.read()).decode()[-2000:]
