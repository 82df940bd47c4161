"""Apply the numbered SQL files in ``migrations/`` once each, under an advisory lock.

Safe to run twice and from two processes at once: the second waits on the lock, then finds
every version recorded and applies nothing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from delivery.errors import ConfigError

# Any constant unique to this platform; shared by every process that migrates.
_ADVISORY_LOCK_KEY = 0x64656C6976657279  # "delivery"
_FILE = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")
DEFAULT_MIGRATIONS_DIR = Path(__file__).resolve().parents[2] / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path


def discover(directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    if not directory.is_dir():
        raise ConfigError(f"DELIVERY_MIGRATIONS_DIR: {directory} is not a directory")
    found = []
    for path in sorted(directory.iterdir()):
        match = _FILE.match(path.name)
        if match:
            found.append(Migration(int(match.group(1)), match.group(2), path))
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise ConfigError(f"two migrations share a version number in {directory}")
    return found


async def migrate(url: str, directory: Path = DEFAULT_MIGRATIONS_DIR) -> list[Migration]:
    """Apply what is missing; return the migrations applied by this call."""
    pending_all = discover(directory)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _ADVISORY_LOCK_KEY)
        try:
            await conn.execute(
                """
                CREATE SCHEMA IF NOT EXISTS delivery;
                CREATE TABLE IF NOT EXISTS delivery.schema_migrations (
                    version    integer PRIMARY KEY,
                    name       text NOT NULL,
                    applied_at timestamptz NOT NULL DEFAULT now()
                );
                """
            )
            rows = await conn.fetch("SELECT version FROM delivery.schema_migrations")
            done = {r["version"] for r in rows}
            applied = []
            for migration in pending_all:
                if migration.version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(migration.path.read_text())
                    await conn.execute(
                        "INSERT INTO delivery.schema_migrations (version, name) VALUES ($1, $2)",
                        migration.version,
                        migration.name,
                    )
                applied.append(migration)
            return applied
        finally:
            await conn.execute("SELECT pg_advisory_unlock($1)", _ADVISORY_LOCK_KEY)
    finally:
        await conn.close()
