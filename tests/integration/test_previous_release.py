"""A rolling upgrade, for real (issue #16; runbooks/rolling-upgrade.md): the previous release's
relay and worker keep working on the new schema, new ones start beside them, then the old ones
drain away; producers on the old library publish throughout.

"The previous release" is main as it stood just before its newest migration(s) landed: the
first parent of the newest first-parent commit that changed ``migrations/``. That is the code
that is running when `delivery migrate` applies those migrations at the start of a rollout,
and the rule stays right as main moves (a new migration moves it forward; commits without one
leave it). Its tree comes from ``git archive`` (nothing in the repository changes) and runs as
``python -m delivery`` with ``PYTHONPATH`` at it, on this venv: its dependencies must be
satisfied here, which the test checks first.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import AsyncIterator, Awaitable, Iterable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import NoReturn

import aiohttp
import asyncpg
import pytest
from packaging.requirements import Requirement
from prometheus_client.parser import text_string_to_metric_families

from delivery import publish_many
from delivery.settings import Settings
from delivery.testing.env import IN_CI
from delivery.testing.factories import add_subscription, balance, trade
from delivery.testing.processes import free_port
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until
from tests.support import settings_env, stop_gracefully

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# What `python -m delivery worker|relay|publish` of a release needs from its tree.
_TREE_PATHS = ("delivery", "workers", "migrations", "pyproject.toml")
_READY_TIMEOUT_S = 60.0
_DELIVERED_TIMEOUT_S = 90.0
PER_PHASE = 12  # events per publisher per phase: trades and balance changes, alternating


def _git(*args: str) -> str:
    result = subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def _unavailable(reason: str) -> NoReturn:
    # CI runs on a full clone of main: there the test must run, never skip.
    if IN_CI:
        pytest.fail(f"the previous-release test cannot run: {reason}")
    pytest.skip(reason)


def previous_release() -> str:
    """The commit of the previous release (module docstring)."""
    try:
        shallow = _git("rev-parse", "--is-shallow-repository")
    except (RuntimeError, OSError) as exc:
        _unavailable(f"not a git checkout with history ({exc})")
    if shallow == "true":
        _unavailable(
            "the repository is a shallow clone: the previous release is not in it "
            "(clone with full history, or `git fetch --unshallow`)"
        )
    newest = _git("log", "--first-parent", "-n", "1", "--format=%H", "HEAD", "--", "migrations")
    return _git("rev-parse", f"{newest}^1")


def extract(commit: str, into: Path) -> Path:
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", commit, *_TREE_PATHS],
        capture_output=True,
        timeout=60,
        check=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


def unmet_requirements(tree: Path) -> list[str]:
    """The old release's runtime dependencies this venv does not satisfy."""
    project = tomllib.loads((tree / "pyproject.toml").read_text())["project"]
    unmet: list[str] = []
    for line in project.get("dependencies", []):
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate():
            continue
        try:
            have = version(req.name)
        except PackageNotFoundError:
            unmet.append(f"{line} (not installed)")
            continue
        if req.specifier and not req.specifier.contains(have, prereleases=True):
            unmet.append(f"{line} (installed {have})")
    return unmet


@dataclass
class Release:
    """One release's code: where its tree is, and how to run a command of it."""

    name: str
    tree: Path

    def env(self, settings: Settings, **extra: str) -> dict[str, str]:
        # PYTHONPATH first: the tree wins over the venv's editable install of this checkout.
        return settings_env(settings, PYTHONPATH=str(self.tree), **extra)

    def run(self, settings: Settings, *args: str, stdin: str = "") -> str:
        result = subprocess.run(
            [sys.executable, "-m", "delivery", *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env(settings),
            cwd=self.tree,  # `-m` puts the working directory first on sys.path
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{self.name} delivery {args}: {result.stderr[-2000:]}"
        return result.stdout

    def imports_from(self, settings: Settings) -> str:
        result = subprocess.run(
            [sys.executable, "-c", "import delivery, workers; print(delivery.__file__)"],
            capture_output=True,
            text=True,
            env=self.env(settings),
            cwd=self.tree,
            timeout=60,
            check=True,
        )
        return result.stdout.strip()


@dataclass
class Running:
    name: str
    proc: asyncio.subprocess.Process
    admin_port: int

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        if self.proc.returncode is not None:
            raise AssertionError(f"{self.name} exited {self.proc.returncode} before ready")
        try:
            async with session.get(f"http://127.0.0.1:{self.admin_port}/readyz") as response:
                return response.status == 200
        except aiohttp.ClientError:
            return False

    async def wait_ready(self, session: aiohttp.ClientSession) -> None:
        await wait_until(
            lambda: self.ready(session),
            timeout_s=_READY_TIMEOUT_S,
            what=f"the {self.name} ready",
            interval_s=0.2,
        )

    async def delivered(self, session: aiohttp.ClientSession) -> float:
        """Its own count of successful attempts (``delivery_attempts_total{outcome=delivered}``)."""
        async with session.get(f"http://127.0.0.1:{self.admin_port}/metrics") as response:
            text = await response.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if (
                    sample.name == "delivery_attempts_total"
                    and sample.labels.get("outcome") == "delivered"
                ):
                    return float(sample.value)
        return 0.0


@contextlib.asynccontextmanager
async def started(
    release: Release, commands: tuple[str, str], settings: Settings, session: aiohttp.ClientSession
) -> AsyncIterator[tuple[Running, Running]]:
    """``python -m delivery relay`` and ``worker`` of ``release``, started together, both ready."""
    procs: list[Running] = []
    try:
        for command in commands:
            port = free_port()
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "delivery",
                command,
                env=release.env(settings, DELIVERY_ADMIN_PORT=str(port)),
                cwd=release.tree,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )
            procs.append(Running(f"{release.name} {command}", proc, port))
        await asyncio.gather(*(r.wait_ready(session) for r in procs))
        yield procs[0], procs[1]
    finally:
        for r in procs:
            if r.proc.returncode is None:
                r.proc.kill()
                await r.proc.wait()


async def _at_least(count: Awaitable[float], want: float) -> bool:
    return await count >= want


def _events(tag: str, count: int) -> list[dict[str, object]]:
    make = (trade, balance)
    return [make[i % 2](i, account=f"acc_up_{i % 3}", id=f"up_{tag}_{i}") for i in range(count)]


def _expected(events: Iterable[dict[str, object]]) -> dict[str, set[str]]:
    ids = {str(e["id"]) for e in events}
    return {
        "/all": ids,
        "/trades": {str(e["id"]) for e in events if e["type"] == "trade.executed"},
    }


async def test_workers_of_the_previous_release_keep_working_on_the_new_schema(
    settings: Settings, tmp_path: Path
) -> None:
    # Given the previous release's tree, runnable on this venv, and a database on the new schema
    commit = previous_release()
    old = Release(f"previous release {commit[:8]}", extract(commit, tmp_path / "old"))
    new = Release("this release", REPO)
    old_migrations = {p.name for p in (old.tree / "migrations").glob("*.sql")}
    new_migrations = {p.name for p in (REPO / "migrations").glob("*.sql")}
    assert old_migrations < new_migrations, "the previous release must lack a migration"
    unmet = unmet_requirements(old.tree)
    assert not unmet, f"this venv cannot run {old.name}: {unmet}"
    assert old.imports_from(settings).startswith(str(old.tree))
    conn = await asyncpg.connect(settings.database_url)
    applied = {
        f"{r['version']:04d}_{r['name']}.sql"
        for r in await conn.fetch("SELECT version, name FROM delivery.schema_migrations")
    }
    assert applied == new_migrations

    published: list[dict[str, object]] = []

    async def publish_old(tag: str) -> None:
        # A producer still on the old library: its `delivery publish` and its SQL. In a thread:
        # the receiver answers from this event loop meanwhile.
        events = _events(f"old_{tag}", PER_PHASE)
        lines = "\n".join(map(json.dumps, events))
        out = json.loads(await asyncio.to_thread(old.run, settings, "publish", stdin=lines))
        assert out == {"published": PER_PHASE, "duplicates": 0}
        published.extend(events)

    async def publish_new(tag: str) -> None:
        events = _events(f"new_{tag}", PER_PHASE)
        async with conn.transaction():
            result = await publish_many(conn, events)
        assert len(result.published) == PER_PHASE
        published.extend(events)

    async def all_delivered(what: str) -> None:
        want = _expected(published)
        await receiver.wait_for(
            lambda r: all(r.unique_ids(path) >= ids for path, ids in want.items()),
            _DELIVERED_TIMEOUT_S,
            what,
        )

    async with (
        Receiver() as receiver,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
    ):
        await add_subscription(conn, receiver, "/all", patterns="*")
        await add_subscription(conn, receiver, "/trades", patterns="trade.*")
        async with started(old, ("relay", "worker"), settings, session) as (old_relay, old_worker):
            # When only the old release runs (the migration was applied before the rollout)
            await publish_old("a")
            await publish_new("a")
            await all_delivered("phase 1: the old release alone delivered everything")
            # (its counter counts once the outcome is recorded, just after the POST)
            pairs = sum(len(ids) for ids in _expected(published).values())
            await wait_until(
                lambda: _at_least(old_worker.delivered(session), pairs),
                timeout_s=30,
                what=f"the old worker's own count of {pairs} deliveries",
            )
            old_alone = await old_worker.delivered(session)
            assert old_alone == pairs
            # And the new release starts beside it, both publishing and consuming
            async with started(new, ("relay", "worker"), settings, session) as (_, new_worker):
                await publish_old("b")
                await publish_new("b")
                await all_delivered("phase 2: old and new side by side")
                # Then the old release drains away (SIGTERM, exit 0)
                assert await stop_gracefully(old_worker.proc) == 0
                assert await stop_gracefully(old_relay.proc) == 0
                await publish_old("c")
                await publish_new("c")
                await all_delivered("phase 3: the new release alone")
                phase_3 = _expected(published[-2 * PER_PHASE :])
                await wait_until(
                    lambda: _at_least(
                        new_worker.delivered(session), sum(map(len, phase_3.values()))
                    ),
                    timeout_s=30,
                    what="the new worker's own count of phase 3's deliveries",
                )

        # Then every event reached every matching subscription exactly once, correctly signed
        want = _expected(published)
        for path, ids in want.items():
            assert receiver.unique_ids(path) == ids, path
            assert receiver.duplicates(path) == {}, path
        arrivals = receiver.delivered()
        assert len(arrivals) == sum(len(ids) for ids in want.values())
        assert all(a.signature_ok for a in arrivals)
        assert len(receiver.arrivals) == len(arrivals)  # not one failed attempt either
        # And both releases did their part: the old one alone in phase 1, the new one alone
        # in phase 3 (counted by each worker itself, above)
        assert old_alone > 0
        assert await conn.fetchval("SELECT count(*) FROM delivery.poison_messages") == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM delivery.deliveries WHERE state <> 'delivered'"
            )
            == 0
        )
    await conn.close()
