"""Apply one catalogued mutant to a copy of the tree and run its kill tests there.

The copy holds what the tests import (the package, the workers, the migrations, the tests, the
chaos harness); ``PYTHONPATH`` puts it ahead of the installed package, so subprocesses that the
tests start (``python -m delivery worker``) run the mutant too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.mutation.catalogue import Mutant

ROOT = Path(__file__).resolve().parents[2]
_COPIED = ("delivery", "workers", "migrations", "tests", "chaos", "bench", "pyproject.toml")
_IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
# A kill test that hangs on a mutant has caught it too (a drain that never ends, a loop): the
# mutant is counted killed by timeout, and said so.
PER_TEST_TIMEOUT_S = 120
RUN_TIMEOUT_S = 600


class CatalogueError(Exception):
    """The catalogue no longer matches the code: fix the entry, not the test."""


@dataclass(frozen=True)
class Verdict:
    mutant: Mutant
    killed: bool
    how: str  # what the kill tests said: the failing test, a timeout, or "all passed"
    duration_s: float


# The verdicts of this run, by mutant id: filled by test_mutants, printed by the conftest.
VERDICTS: dict[str, Verdict] = {}


def copy_tree(into: Path) -> Path:
    for name in _COPIED:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name, ignore=_IGNORE)
        elif source.exists():
            shutil.copy2(source, into / name)
    return into


def apply(mutant: Mutant, root: Path) -> None:
    path = root / mutant.path
    text = path.read_text()
    for old, new in mutant.edits:
        found = text.count(old)
        if found != 1:
            raise CatalogueError(
                f"{mutant.id}: {mutant.path} holds the text to replace {found} times, not once: "
                f"{old.strip()[:80]!r}"
            )
        text = text.replace(old, new)
    path.write_text(text)


def run(mutant: Mutant, workdir: Path, env: dict[str, str]) -> Verdict:
    """Copy, mutate, run the kill tests; killed when any of them fails or hangs."""
    if not mutant.kill:
        raise CatalogueError(f"{mutant.id}: no kill tests listed")
    root = copy_tree(workdir / mutant.id)
    apply(mutant, root)
    env = {**env, "PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1"}
    command = [
        sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider",
        "-p", "no:cov", f"--timeout={PER_TEST_TIMEOUT_S}", "-o", "addopts=", *mutant.kill,
    ]  # fmt: skip
    started = time.monotonic()
    try:
        done = subprocess.run(
            command, cwd=root, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Verdict(mutant, True, "killed by timeout", time.monotonic() - started)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    duration_s = time.monotonic() - started
    if done.returncode == 0:
        return Verdict(mutant, False, "all kill tests passed", duration_s)
    if done.returncode != 1:  # 2 interrupted, 3 internal, 4 usage, 5 nothing collected
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise CatalogueError(f"{mutant.id}: pytest exited {done.returncode}: {' | '.join(tail)}")
    return Verdict(mutant, True, _first_failure(done.stdout), duration_s)


def _first_failure(output: str) -> str:
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line[:300]
    return "a kill test failed"
