"""The package as a new user gets it: an sdist built from the project's files, a wheel built from
that sdist, installed into a fresh virtualenv, and run from a directory outside the checkout
against the suite's services: `--version`, `migrate` (the bundled migrations, no setting) and a
300-event demo.

Bounded and offline: both builds use this environment's setuptools (no build isolation), and the
wheel is installed with --no-deps; the fresh venv reaches its dependencies through a .pth line
naming this environment's site-packages (a .pth there is not processed, so the editable install
of the checkout stays invisible), and the test checks that every requirement the wheel declares
is met there and that `delivery` is imported from the fresh venv.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from delivery.bundled import bundled_dir
from delivery.demo.summary import OK_LINE
from delivery.testing.env import environment_without_settings
from delivery.testing.services import create_database, drop_database

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
# What a clean clone holds that the build needs; dev tooling is left behind on purpose.
PROJECT_FILES = ("pyproject.toml", "setup.py", "MANIFEST.in", "LICENSE", "README.md")
PROJECT_DIRS = ("delivery", "workers", "migrations", "runbooks", "chaos", "bench", "tests")
REQUIREMENTS_MET = """
import importlib.metadata as md
from packaging.requirements import Requirement
missing = []
for line in md.requires("delivery-webhooks") or []:
    req = Requirement(line)
    if req.marker and not req.marker.evaluate({"extra": ""}):
        continue
    try:
        found = md.version(req.name)
    except md.PackageNotFoundError:
        missing.append(f"{req}: not installed")
        continue
    if not req.specifier.contains(found, prereleases=True):
        missing.append(f"{req}: {found}")
print("\\n".join(missing))
"""


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout_s: float = 300):
    result = subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    assert result.returncode == 0, f"{args}: {result.stdout}\n{result.stderr}"
    return result


def copy_project(target: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "_bundled", "*.egg-info", "out")
    target.mkdir()
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, target / name)
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    return target


def build(work: Path) -> tuple[Path, Path]:
    """sdist from a copy of the project, then the wheel from the unpacked sdist."""
    source = copy_project(work / "project")
    dist = work / "dist"
    script = f"from setuptools import build_meta; print(build_meta.build_sdist({str(dist)!r}))"
    sdist = dist / run(sys.executable, "-c", script, cwd=source).stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        tar.extractall(work / "unpacked", filter="data")
    (unpacked,) = (work / "unpacked").iterdir()
    run(
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--wheel-dir",
        dist,
        unpacked,
        cwd=work,
    )
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


def fresh_venv(work: Path, wheel: Path) -> Path:
    venv = work / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=work)
    python = venv / "bin" / "python"
    run(
        sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
        wheel, cwd=work,
    )  # fmt: skip
    site = Path(
        run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=work)
        .stdout.strip()
    )
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_suite_dependencies.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def test_sdist_and_wheel_carry_the_migrations_and_runbooks_but_no_dev_tooling(tmp_path):
    sdist, wheel = build(tmp_path)
    migrations = sorted(p.name for p in bundled_dir("migrations").glob("*.sql"))
    runbooks = sorted(p.name for p in bundled_dir("runbooks").glob("*.md"))

    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {f"migrations/{m}" for m in migrations} <= in_sdist
    assert {f"runbooks/{r}" for r in runbooks} <= in_sdist
    assert "LICENSE" in in_sdist
    assert not {n for n in in_sdist if n.split("/")[0] in ("chaos", "bench", "tests")}

    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"delivery", "workers"}
    assert {f"delivery/_bundled/migrations/{m}" for m in migrations} <= set(names)
    assert {f"delivery/_bundled/runbooks/{r}" for r in runbooks} <= set(names)
    # The web page's static files (served at /ui/), built from the sdist too.
    assert {f"delivery/api/ui/{f}" for f in ("index.html", "app.js", "app.css")} <= set(names)
    metadata = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/METADATA"))
    ).decode()
    assert "Name: delivery-webhooks" in metadata
    assert "License-Expression: MIT" in metadata
    assert "Project-URL: Source" in metadata
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


async def test_the_installed_wheel_runs_outside_the_checkout(services, tmp_path):
    _sdist, wheel = build(tmp_path)
    venv = fresh_venv(tmp_path, wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    python, delivery = venv / "bin" / "python", venv / "bin" / "delivery"
    env = environment_without_settings()

    where = run(python, "-c", "import delivery, workers; print(delivery.__file__)", cwd=elsewhere)
    assert where.stdout.strip().startswith(str(venv)), where.stdout
    unmet = run(python, "-c", REQUIREMENTS_MET, cwd=elsewhere).stdout.strip()
    assert unmet == "", unmet

    version = run(delivery, "--version", cwd=elsewhere, env=env).stdout.strip()
    assert version == f"delivery-webhooks {wheel.name.split('-')[1]}"

    name = f"dlv_wheel_{tmp_path.name[-8:].lower().replace('-', '_')}"
    url = await create_database(services.database_url, name)
    try:
        migrated = run(delivery, "migrate", cwd=elsewhere, env={**env, "DELIVERY_DATABASE_URL": url})
        expected = sorted(p.stem for p in bundled_dir("migrations").glob("*.sql"))
        assert migrated.stdout.strip() == '{"applied": ' + str(expected).replace("'", '"') + "}"
    finally:
        await drop_database(services.database_url, name)

    demo_env = {
        **env,
        "DELIVERY_DATABASE_URL": services.database_url,
        "DELIVERY_AMQP_URL": services.amqp_url,
    }
    demo = run(delivery, "demo", "--events", "300", cwd=elsewhere, env=demo_env, timeout_s=240)
    assert OK_LINE in demo.stdout.splitlines(), demo.stdout
