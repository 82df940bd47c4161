"""Migrations you can trust: each applied file's checksum is recorded and a changed one is
refused before anything is applied; a marked file runs outside a transaction (CREATE INDEX
CONCURRENTLY), also with a second process waiting for the lock; `migrate --status` lists what
is applied, pending and changed. Each test migrates a fresh, empty database of its own from a
copy of the real migrations."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
import pytest_asyncio

from delivery.errors import MigrationChangedError
from delivery.store.migrations import DEFAULT_MIGRATIONS_DIR, NO_TRANSACTION_MARKER, migrate
from delivery.testing.env import environment_without_settings
from delivery.testing.services import create_database, drop_database

pytestmark = pytest.mark.integration

CONCURRENT_INDEX = f"""{NO_TRANSACTION_MARKER}
-- Rerunnable after a failure: a failed CONCURRENTLY build leaves an invalid index behind.
DROP INDEX CONCURRENTLY IF EXISTS delivery.outbox_test_concurrent_idx;
CREATE INDEX CONCURRENTLY outbox_test_concurrent_idx
    ON delivery.outbox (account_id, sequence);
"""


@pytest_asyncio.fixture(loop_scope="session")
async def empty_db(services) -> AsyncIterator[str]:
    name = f"dlv_mig_{secrets.token_hex(5)}"
    url = await create_database(services.database_url, name)
    yield url
    await drop_database(services.database_url, name)


@pytest.fixture
def migrations(tmp_path: Path) -> Path:
    copy = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, copy)
    return copy


def cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = environment_without_settings()
    env["DELIVERY_DATABASE_URL"] = url
    return subprocess.run(
        [sys.executable, "-m", "delivery", "migrate", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


async def recorded(url: str) -> dict[str, str | None]:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            "SELECT version, name, checksum FROM delivery.schema_migrations ORDER BY version"
        )
    finally:
        await conn.close()
    return {f"{r['version']:04d}_{r['name']}.sql": r["checksum"] for r in rows}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_each_applied_file_has_its_checksum_recorded(empty_db, migrations):
    await migrate(empty_db, migrations)
    files = sorted(migrations.glob("*.sql"))
    assert await recorded(empty_db) == {p.name: sha256(p) for p in files}


async def test_a_changed_applied_migration_is_refused_in_one_line_and_nothing_applies(
    empty_db, migrations
):
    await migrate(empty_db, migrations)
    changed = sorted(migrations.glob("*.sql"))[2]
    changed.write_text(changed.read_text() + "\n-- an innocent-looking edit\n")
    (migrations / "0099_later.sql").write_text("CREATE TABLE delivery.later (id int);\n")

    result = cli(empty_db, "--dir", str(migrations))

    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1, result.stderr
    assert changed.name in result.stderr and "changed since it was applied" in result.stderr
    assert "0099_later.sql" not in await recorded(empty_db)
    with pytest.raises(MigrationChangedError):
        await migrate(empty_db, migrations)


async def test_a_database_migrated_before_checksums_gets_them_and_keeps_its_history(
    empty_db, migrations
):
    await migrate(empty_db, migrations)
    conn = await asyncpg.connect(empty_db)
    try:
        # What an older release left behind: the table without the column.
        await conn.execute("ALTER TABLE delivery.schema_migrations DROP COLUMN checksum")
    finally:
        await conn.close()
    status = cli(empty_db, "--dir", str(migrations), "--status")
    assert status.returncode == 0, status.stderr
    assert all(line.startswith("applied ") for line in status.stdout.splitlines())

    assert await migrate(empty_db, migrations) == []

    files = sorted(migrations.glob("*.sql"))
    assert await recorded(empty_db) == {p.name: sha256(p) for p in files}


async def test_a_marked_migration_runs_outside_a_transaction(empty_db, migrations):
    (migrations / "0099_concurrent_index.sql").write_text(CONCURRENT_INDEX)

    applied = await migrate(empty_db, migrations)

    assert applied[-1].name == "concurrent_index"
    conn = await asyncpg.connect(empty_db)
    try:
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = 'delivery.outbox_test_concurrent_idx'::regclass"
        )
    finally:
        await conn.close()
    assert valid is True


async def test_without_the_marker_postgresql_refuses_the_concurrent_index(empty_db, migrations):
    # The control: what the marker is for.
    unmarked = CONCURRENT_INDEX.removeprefix(NO_TRANSACTION_MARKER + "\n")
    (migrations / "0099_concurrent_index.sql").write_text(unmarked)
    with pytest.raises(asyncpg.ActiveSQLTransactionError):
        await migrate(empty_db, migrations)
    assert "0099_concurrent_index.sql" not in await recorded(empty_db)


async def test_two_processes_migrate_at_once_with_a_concurrent_index(empty_db, migrations):
    # The second waits for the lock while the first builds the index CONCURRENTLY, which waits
    # for every older snapshot: a waiter blocked inside pg_advisory_lock would deadlock it.
    (migrations / "0099_concurrent_index.sql").write_text(CONCURRENT_INDEX)

    results = await asyncio.wait_for(
        asyncio.gather(migrate(empty_db, migrations), migrate(empty_db, migrations)), 120
    )

    assert sorted(len(r) for r in results) == [0, len(list(migrations.glob("*.sql")))]


async def test_status_lists_applied_pending_and_changed_files(empty_db, migrations):
    files = sorted(migrations.glob("*.sql"))
    later = files[-1]
    held_back = later.read_bytes()
    later.unlink()
    await migrate(empty_db, migrations)
    later.write_bytes(held_back)
    files[0].write_text(files[0].read_text() + "\n-- edited\n")

    result = cli(empty_db, "--dir", str(migrations), "--status")

    assert result.returncode == 0, result.stderr
    states = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert states == {
        files[0].name: "changed",
        **{p.name: "applied" for p in files[1:-1]},
        later.name: "pending",
    }
    assert list(await recorded(empty_db)) == [p.name for p in files[:-1]]  # it only reads


async def test_the_ordered_migration_runs_again_after_a_failure_part_way(empty_db, migrations):
    # 0022 runs outside a transaction with plpgsql bodies (whose own `;` lines are no statement
    # ends): after a failure part way, migrate runs the whole file again, so every statement
    # must be rerunnable. Here: every statement already applied, the file not recorded.
    await migrate(empty_db, migrations)
    conn = await asyncpg.connect(empty_db)
    try:
        await conn.execute("DELETE FROM delivery.schema_migrations WHERE version = 22")
        applied = await migrate(empty_db, migrations)
        assert [m.name for m in applied] == ["ordered_subscriptions"]
        triggers = await conn.fetchval(
            "SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'deliveries_ordered_%'"
        )
        valid = await conn.fetchval(
            "SELECT indisvalid FROM pg_index"
            " WHERE indexrelid = 'delivery.deliveries_ordered_unfinished'::regclass"
        )
    finally:
        await conn.close()
    assert (triggers, valid) == (3, True)
