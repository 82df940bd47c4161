"""Apply the numbered SQL files in ``migrations/`` once each, under an advisory lock.

Safe to run twice and from two processes at once: the second waits for the lock, then finds
every version recorded and applies nothing.

Each applied file's SHA-256 is recorded; a file changed after it was applied stops ``migrate``
before it applies anything (rows recorded by releases without checksums get the current file's
checksum the first time they are seen). A file whose first line is ``-- delivery:no-transaction``
runs outside a transaction, one statement at a time (a statement ends with a line ending in
``;`` outside a ``$$``-quoted function body), for ``CREATE INDEX CONCURRENTLY``; it is recorded
only once every statement succeeded, so write it to be run again after a failure (``DROP INDEX
CONCURRENTLY IF EXISTS`` first).
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path

import asyncpg

from delivery.bundled import bundled_dir
from delivery.errors import ConfigError, MigrationChangedError

# Any constant unique to this platform; shared by every process that migrates.
_ADVISORY_LOCK_KEY = 0x64656C6976657279  # "delivery"
# A waiter polls instead of blocking in pg_advisory_lock: a blocked call is a statement with a
# snapshot, which CREATE INDEX CONCURRENTLY in the lock holder would wait for (a deadlock).
_LOCK_POLL_S = 0.2
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
NO_TRANSACTION_MARKER = "-- delivery:no-transaction"
_STATEMENT_END = re.compile(r";[ \t]*$", re.MULTILINE)
DEFAULT_MIGRATIONS_DIR = bundled_dir("migrations")


def migrations_dir(configured: str = "") -> Path:
    """``DELIVERY_MIGRATIONS_DIR`` (or ``--dir``) when set, else the bundled migrations."""
    return Path(configured) if configured else DEFAULT_MIGRATIONS_DIR


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path
    sql: str
    checksum: str

    @property
    def file(self) -> str:
        return self.path.name

    @property
    def transactional(self) -> bool:
        first_line = self.sql.lstrip("\ufeff").split("\n", 1)[0].strip()
        return first_line != NO_TRANSACTION_MARKER

    def statements(self) -> list[str]:
        """The file's statements, for a run outside a transaction (comment-only parts skipped)."""
        parts, start = [], 0
        for end in _STATEMENT_END.finditer(self.sql):
            if self.sql.count("$$", start, end.start()) % 2:
                continue  # inside a function body: its statements are the function's
            parts.append(self.sql[start : end.end()])
            start = end.end()
        parts.append(self.sql[start:])
        return [p.strip() for p in parts if _has_code(p)]


def _has_code(sql: str) -> bool:
    return any(
        line.strip() and not line.strip().startswith("--") for line in sql.splitlines()
    )


def discover(directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise ConfigError(f"DELIVERY_MIGRATIONS_DIR: {directory} is not a directory")
    found = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match:
            raw = path.read_bytes()
            found.append(
                Migration(
                    int(match.group(1)),
                    match.group(2),
                    path,
                    raw.decode("utf-8"),
                    hashlib.sha256(raw).hexdigest(),
                )
            )
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a version number in {directory}")
    return found


class State(StrEnum):
    APPLIED = "applied"
    PENDING = "pending"
    CHANGED = "changed"  # applied, and the file differs from what was applied
    MISSING = "missing"  # applied, and no file has that version here (a newer release's)


@dataclass(frozen=True)
class MigrationStatus:
    file: str
    state: State
    applied_at: datetime | None


_CREATE_TABLE = """
CREATE SCHEMA IF NOT EXISTS delivery;
CREATE TABLE IF NOT EXISTS delivery.schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
-- Databases migrated by releases before checksums have the table without the column.
ALTER TABLE delivery.schema_migrations ADD COLUMN IF NOT EXISTS checksum text;
"""


async def migrate(url: str, directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; return the migrations applied by this call.

    ``MigrationChangedError`` (nothing applied) when an applied file has changed since.
    """
    found = discover(directory)
    conn = await asyncpg.connect(url)
    try:
        await _lock(conn)
        try:
            await conn.execute(_CREATE_TABLE)
            rows = await conn.fetch("SELECT version, checksum FROM delivery.schema_migrations")
            recorded = {r["version"]: r["checksum"] for r in rows}
            await _verify(conn, found, recorded)
            applied = []
            for migration in found:
                if migration.version not in recorded:
                    await _apply(conn, migration)
                    applied.append(migration)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    finally:
        await conn.close()


async def _lock(conn: asyncpg.Connection) -> None:
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", _ADVISORY_LOCK_KEY):  # noqa: ASYNC110
        await asyncio.sleep(_LOCK_POLL_S)


async def _verify(
    conn: asyncpg.Connection, found: list[Migration], recorded: dict[int, str | None]
) -> None:
    for migration in found:
        if migration.version not in recorded:
            continue
        checksum = recorded[migration.version]
        if checksum is None:
            await conn.execute(
                "UPDATE delivery.schema_migrations SET checksum = $2 WHERE version = $1",
                migration.version,
                migration.checksum,
            )
        elif checksum != migration.checksum:
            raise MigrationChangedError(
                f"{migration.file}: changed since it was applied (sha256 {checksum[:12]}, now"
                f" {migration.checksum[:12]}); restore it and put the change in a new migration"
            )


async def _apply(conn: asyncpg.Connection, migration: Migration) -> None:
    record = (
        "INSERT INTO delivery.schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
    )
    args = (migration.version, migration.name, migration.checksum)
    if migration.transactional:
        async with conn.transaction():
            await conn.execute(migration.sql)
            await conn.execute(record, *args)
        return
    # One statement per query: several in one query string run in one implicit transaction.
    for statement in migration.statements():
        await conn.execute(statement)
    await conn.execute(record, *args)


async def status(url: str, directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[MigrationStatus]:
    """Every migration file and every applied version, in version order. Reads only."""
    found = {m.version: m for m in discover(directory)}
    conn = await asyncpg.connect(url)
    try:
        exists = await conn.fetchval(
            "SELECT to_regclass('delivery.schema_migrations') IS NOT NULL"
        )
        rows = []
        if exists:
            has_checksum = await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM information_schema.columns"
                " WHERE table_schema = 'delivery' AND table_name = 'schema_migrations'"
                " AND column_name = 'checksum')"
            )
            checksum = "checksum" if has_checksum else "NULL::text AS checksum"
            rows = await conn.fetch(
                f"SELECT version, name, applied_at, {checksum} FROM delivery.schema_migrations"
            )
    finally:
        await conn.close()
    applied = {r["version"]: r for r in rows}
    result = []
    for version in sorted(found.keys() | applied.keys()):
        migration, row = found.get(version), applied.get(version)
        if row is None:
            assert migration is not None
            result.append(MigrationStatus(migration.file, State.PENDING, None))
        elif migration is None:
            name = f"{version:04d}_{row['name']}.sql"
            result.append(MigrationStatus(name, State.MISSING, row["applied_at"]))
        else:
            changed = row["checksum"] is not None and row["checksum"] != migration.checksum
            state = State.CHANGED if changed else State.APPLIED
            result.append(MigrationStatus(migration.file, state, row["applied_at"]))
    return result
