"""compose.yaml (local use) is checked offline, as no Docker engine runs here: validated against
the Compose Specification's JSON schema (the copy the check-jsonschema package ships), then
checked for what the platform needs: PostgreSQL and three RabbitMQ nodes forming one cluster,
DELIVERY_AMQP_URL naming all three, the migrate step completed before relay and worker start,
healthchecks on everything waited for, a stop grace period above the drain deadline, and the
same non-root, read-only containers as in Kubernetes. Each property is broken once on purpose
to show the check sees it."""

from __future__ import annotations

import copy
import importlib.resources
import json
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

from delivery.cli.parser import build_parser
from delivery.settings import ENV_PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose.yaml"
RABBITMQ_NODES = ("rabbitmq-1", "rabbitmq-2", "rabbitmq-3")
PROCESSES = {"relay", "worker"}
UID = "10001"
# Contract variables that the branches of #12 and #14 add to Settings (see test_k8s.py).
PENDING_SETTINGS = {"DELIVERY_ADMIN_HOST", "DELIVERY_ALLOW_PRIVATE_TARGETS"}
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: Any) -> Any:
    """``${NAME:-default}`` as Compose substitutes it with ``NAME`` unset (this check must not
    depend on the shell running it)."""
    if isinstance(value, dict):
        return {k: interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v) for v in value]
    if isinstance(value, str):
        return _VARIABLE.sub(lambda m: m.group(2) or "", value)
    return value


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load(COMPOSE.read_text()))


def _schema_errors(document: dict[str, Any]) -> list[str]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema = json.loads(vendored.joinpath("compose-spec.json").read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'.'.join(str(p) for p in error.path)}: {error.message}"
        for error in validator.iter_errors(document)
    ]


def test_compose_yaml_matches_the_compose_specification_schema(compose: dict[str, Any]):
    assert _schema_errors(compose) == []


def test_schema_validation_refuses_a_misspelt_key(compose: dict[str, Any]):
    broken = copy.deepcopy(compose)
    broken["services"]["worker"]["stop_grace_periode"] = "45s"
    assert any("stop_grace_periode" in e for e in _schema_errors(broken))


def _seconds(duration: str) -> float:
    """A Compose duration (``45s``, ``1m30s``, ``500ms``)."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration}"
    return sum(float(n) * units[u] for n, u in parts)


def problems(compose: dict[str, Any]) -> list[str]:
    """Every property the platform needs that the file breaks, one line each."""
    services = compose.get("services", {})
    missing = {"postgres", "migrate", *RABBITMQ_NODES, *PROCESSES} - set(services)
    if missing:
        return [f"services missing: {sorted(missing)}"]
    found = list(_cluster_problems(services))
    for name in ("migrate", *sorted(PROCESSES)):
        found.extend(f"{name}: {p}" for p in _process_problems(services, name))
    for name, service in services.items():
        for target, rule in (service.get("depends_on") or {}).items():
            if rule.get("condition") == "service_healthy" and "healthcheck" not in services.get(
                target, {}
            ):
                found.append(f"{name} waits for {target} to be healthy; it has no healthcheck")
    return found


def _cluster_problems(services: dict[str, Any]) -> Iterator[str]:
    cookies = {
        services[n].get("environment", {}).get("RABBITMQ_ERLANG_COOKIE") for n in RABBITMQ_NODES
    }
    if len(cookies) != 1 or None in cookies:
        yield "the RabbitMQ nodes must share one RABBITMQ_ERLANG_COOKIE"
    hostnames = [services[n].get("hostname") for n in RABBITMQ_NODES]
    if hostnames != list(RABBITMQ_NODES):
        yield f"each RabbitMQ node needs its service name as hostname, found {hostnames}"
    for node in RABBITMQ_NODES:
        if "healthcheck" not in services[node]:
            yield f"{node}: no healthcheck"
        configs = [
            v.split(":")[0]
            for v in services[node].get("volumes", [])
            if v.split(":")[1] == "/etc/rabbitmq/rabbitmq.conf"
        ]
        if len(configs) != 1:
            yield f"{node}: mounts no rabbitmq.conf"
            continue
        text = (ROOT / configs[0]).read_text()
        peers = set(
            re.findall(
                r"^cluster_formation\.classic_config\.nodes\.\d+ = (\S+)$", text, flags=re.MULTILINE
            )
        )
        if peers != {f"rabbit@{n}" for n in RABBITMQ_NODES}:
            yield f"{node}: {configs[0]} must list the three nodes to cluster, lists {peers}"
    if "healthcheck" not in services["postgres"]:
        yield "postgres: no healthcheck"


def _process_problems(services: dict[str, Any], name: str) -> Iterator[str]:
    service = services[name]
    command = service.get("command")
    if not command or command[0] != name:
        yield f"command must be [{name}] (the image's entrypoint is `delivery`)"
    else:
        try:
            build_parser().parse_args(command)
        except SystemExit:
            yield f"`delivery {' '.join(command)}` does not parse"
    yield from _security_problems(service)
    env = service.get("environment", {})
    yield from _env_problems(env, needs_broker=name != "migrate")
    if name == "migrate":
        if service.get("restart", "no") != "no":
            yield "migrate runs once: restart must be no"
        return
    depends = service.get("depends_on") or {}
    waits = {t: r.get("condition") for t, r in depends.items()}
    wanted = {"migrate": "service_completed_successfully", "postgres": "service_healthy"}
    wanted.update(dict.fromkeys(RABBITMQ_NODES, "service_healthy"))
    for target, condition in wanted.items():
        if waits.get(target) != condition:
            yield f"must wait for {target} ({condition}), waits {waits.get(target)}"
    test = " ".join(service.get("healthcheck", {}).get("test", []))
    port = env.get("DELIVERY_ADMIN_PORT", str(Settings.model_fields["admin_port"].default))
    if not re.search(rf"127\.0\.0\.1:{port}/(healthz|readyz)\b", test):
        yield f"healthcheck must GET /healthz or /readyz on the admin port {port}: {test!r}"
    shutdown_s = float(
        env.get("DELIVERY_SHUTDOWN_TIMEOUT_S", Settings.model_fields["shutdown_timeout_s"].default)
    )
    grace_s = _seconds(service.get("stop_grace_period", "10s"))
    if not grace_s > shutdown_s:
        yield f"stop_grace_period {grace_s:g}s must exceed DELIVERY_SHUTDOWN_TIMEOUT_S {shutdown_s:g}"


def _security_problems(service: dict[str, Any]) -> Iterator[str]:
    if str(service.get("user", "")).split(":")[0] != UID:
        yield f"user must be {UID}, the image's numeric user"
    if service.get("read_only") is not True:
        yield "read_only must be true"
    if "ALL" not in service.get("cap_drop", []) or service.get("cap_add"):
        yield "cap_drop must be ALL and cap_add empty"
    if "no-new-privileges:true" not in service.get("security_opt", []):
        yield "security_opt must hold no-new-privileges:true"


def _env_problems(env: dict[str, Any], *, needs_broker: bool) -> Iterator[str]:
    if not isinstance(env, dict):
        yield "environment must be a mapping"
        return
    database = urlsplit(env.get("DELIVERY_DATABASE_URL", ""))
    if database.hostname != "postgres":
        yield f"DELIVERY_DATABASE_URL must point at the postgres service: {database.geturl()!r}"
    if needs_broker:
        urls = env.get("DELIVERY_AMQP_URL", "").split(",")
        hosts = [urlsplit(u).hostname for u in urls if urlsplit(u).scheme == "amqp"]
        if len(hosts) != len(urls) or sorted(hosts) != sorted(RABBITMQ_NODES):
            yield f"DELIVERY_AMQP_URL must list the three RabbitMQ nodes, comma-separated: {urls}"
    known = {
        field.alias or ENV_PREFIX + name.upper() for name, field in Settings.model_fields.items()
    }
    unknown = {n for n in env if n.startswith(ENV_PREFIX)} - known - PENDING_SETTINGS
    if unknown:
        yield f"not settings: {sorted(unknown)}"


def test_compose_yaml_holds_every_property(compose: dict[str, Any]):
    assert problems(compose) == []


def test_the_processes_environment_loads_with_the_real_settings(
    compose: dict[str, Any], monkeypatch: pytest.MonkeyPatch
):
    for name in ("migrate", *sorted(PROCESSES)):
        for variable in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
            monkeypatch.delenv(variable)
        for variable, value in compose["services"][name]["environment"].items():
            monkeypatch.setenv(variable, str(value))
        settings = Settings()
        assert settings.amqp_url.count("amqp://") == 3


Breakage = Callable[[dict[str, Any]], object]
BREAKAGES: dict[str, tuple[Breakage, str]] = {
    "grace period at the drain deadline": (
        lambda c: c["services"]["worker"].update(stop_grace_period="30s"),
        "must exceed DELIVERY_SHUTDOWN_TIMEOUT_S",
    ),
    "no grace period (Compose waits 10 s)": (
        lambda c: c["services"]["relay"].pop("stop_grace_period"),
        "stop_grace_period 10s",
    ),
    "relay starts before migrate completes": (
        lambda c: c["services"]["relay"]["depends_on"]["migrate"].update(
            condition="service_started"
        ),
        "must wait for migrate",
    ),
    "worker does not wait for a node": (
        lambda c: c["services"]["worker"].update(
            depends_on={
                k: v for k, v in c["services"]["worker"]["depends_on"].items() if k != "rabbitmq-3"
            }
        ),
        "must wait for rabbitmq-3",
    ),
    "one AMQP URL only": (
        lambda c: c["services"]["worker"]["environment"].update(
            DELIVERY_AMQP_URL="amqp://delivery:delivery@rabbitmq-1:5672/"
        ),
        "must list the three RabbitMQ nodes",
    ),
    "a node with its own cookie": (
        lambda c: c["services"]["rabbitmq-2"]["environment"].update(RABBITMQ_ERLANG_COOKIE="x"),
        "share one RABBITMQ_ERLANG_COOKIE",
    ),
    "a node without healthcheck": (
        lambda c: c["services"]["rabbitmq-3"].pop("healthcheck"),
        "rabbitmq-3: no healthcheck",
    ),
    "postgres without healthcheck": (
        lambda c: c["services"]["postgres"].pop("healthcheck"),
        "no healthcheck",
    ),
    "healthcheck on another port": (
        lambda c: c["services"]["worker"]["environment"].update(DELIVERY_ADMIN_PORT="9700"),
        "on the admin port 9700",
    ),
    "runs as root": (lambda c: c["services"]["relay"].update(user="0:0"), "user must be"),
    "writable root filesystem": (
        lambda c: c["services"]["migrate"].pop("read_only"),
        "read_only",
    ),
    "capabilities kept": (
        lambda c: c["services"]["worker"].update(cap_drop=[]),
        "cap_drop must be ALL",
    ),
    "privileges may grow": (
        lambda c: c["services"]["relay"].update(security_opt=[]),
        "no-new-privileges",
    ),
    "the wrong command": (
        lambda c: c["services"]["worker"].update(command=["run"]),
        "command must be [worker]",
    ),
    "migrate restarts forever": (
        lambda c: c["services"]["migrate"].update(restart="always"),
        "restart must be no",
    ),
    "a misspelt setting": (
        lambda c: c["services"]["relay"]["environment"].update(DELIVERY_SHUTDOWN_TIMEOUT="30"),
        "not settings",
    ),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
def test_each_check_sees_its_property_broken(breakage: str, compose: dict[str, Any]):
    broken = copy.deepcopy(compose)
    mutate, expected = BREAKAGES[breakage]
    mutate(broken)
    found = problems(broken)
    assert any(expected in p for p in found), found
