"""No Docker engine runs here, so the Dockerfile is checked by parsing it, and the lock it
installs from by reading it."""

import re
import tomllib
from pathlib import Path

from dockerfile_parse import DockerfileParser
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def parse() -> DockerfileParser:
    parser = DockerfileParser(fileobj=(ROOT / "Dockerfile").open("rb"))
    return parser


def instructions(kind: str) -> list[str]:
    return [i["value"] for i in parse().structure if i["instruction"] == kind]


def test_multi_stage_on_a_slim_python_base():
    froms = parse().parent_images  # build arguments resolved
    assert len(froms) >= 2
    assert all(f.startswith("python:3.11-slim") for f in froms)


def test_entrypoint_is_the_installed_console_script():
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = parse().json  # noqa: F841 - parsing must succeed
    (value,) = instructions("ENTRYPOINT")
    assert value.strip() == '["delivery"]'
    assert "delivery" in scripts


def test_runs_as_a_numeric_non_root_user_with_a_healthcheck_that_knows_the_port_may_be_off():
    users = instructions("USER")
    assert users and re.fullmatch(r"[1-9][0-9]*(:[1-9][0-9]*)?", users[-1]), users
    (health,) = instructions("HEALTHCHECK")
    # The module probes /healthz and passes with the admin port off (tests/integration/test_admin).
    assert '"python", "-m", "delivery.ops.healthcheck"' in health


def test_the_admin_server_listens_on_every_address_in_the_image_only():
    env = " ".join(instructions("ENV"))
    assert "DELIVERY_ADMIN_HOST=0.0.0.0" in env
    from delivery.settings import Settings

    assert Settings.model_fields["admin_host"].default == "127.0.0.1"


def test_the_image_installs_the_wheel_with_its_migrations_and_no_dev_tooling():
    copied = " ".join(instructions("COPY"))
    assert "migrations" in copied and "runbooks" in copied  # bundled into the wheel
    assert not re.search(r"\b(chaos|bench|tests)\b", copied)
    # The migrations are found inside the installed package, with no setting.
    assert "DELIVERY_MIGRATIONS_DIR" not in " ".join(instructions("ENV"))


def _locked() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as {name: (version, hashes)}."""
    text = (ROOT / "requirements.lock").read_text().replace("\\\n", " ")
    pins = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)(.*)$", line)
        if match:
            hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", match.group(3))
            pins[canonicalize_name(match.group(1))] = (match.group(2), hashes)
    return pins


def test_the_lock_pins_every_runtime_and_build_dependency_with_hashes():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = pyproject["project"]["dependencies"] + pyproject["build-system"]["requires"]
    pins = _locked()
    for line in needed:
        req = Requirement(line)
        name = canonicalize_name(req.name)
        assert name in pins, f"{name} is a runtime dependency missing from requirements.lock"
        version, _ = pins[name]
        assert req.specifier.contains(version), f"{name}=={version} is outside {req.specifier}"
    unhashed = [name for name, (_, hashes) in pins.items() if not hashes]
    assert unhashed == []


def test_the_image_installs_its_dependencies_from_the_lock_with_hashes_required():
    runs = " ".join(instructions("RUN"))
    assert "--require-hashes" in runs and "-r requirements.lock" in runs
    assert "--no-build-isolation" in runs  # the project is built with the locked setuptools
    assert any("requirements.lock" in c for c in instructions("COPY"))
