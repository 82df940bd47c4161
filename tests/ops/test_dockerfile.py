"""No Docker engine runs here, so the Dockerfile is checked by parsing it."""

import tomllib
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]


def parse() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(ROOT / "Dockerfile").open("rb"))
    return parser


def instructions(kind: str) -> list[str]:
    return [i["value"] for i in parse().structure if i["instruction"] == kind]


def test_multi_stage_on_a_slim_python_base():
    froms = instructions("FROM")
    assert len(froms) >= 2
    assert all("python:3.11-slim" in f for f in froms)


def test_entrypoint_is_the_installed_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = parse().json  # noqa: F841 - parsing must succeed
    (value,) = instructions("ENTRYPOINT")
    assert value.strip() == '["delivery"]'
    assert "delivery" in scripts


def test_runs_as_a_non_root_user_with_a_healthcheck():
    users = instructions("USER")
    assert users and users[-1] not in ("root", "0")
    (health,) = instructions("HEALTHCHECK")
    assert "/healthz" in health


def test_migrations_ship_in_the_image_where_the_runner_looks():
    assert any("migrations" in c for c in instructions("COPY"))
    env = " ".join(instructions("ENV"))
    assert "DELIVERY_MIGRATIONS_DIR=/app/migrations" in env
