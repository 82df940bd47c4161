"""The facts a run records beside its figures (with ``bench.measure.machine_facts``): the client
libraries' versions, the servers' versions and settings, and the code measured."""

from __future__ import annotations

import contextlib
import importlib.metadata
import subprocess
from pathlib import Path

import aio_pika
import asyncpg

REPO = Path(__file__).resolve().parent.parent

PACKAGES = (
    "celery",
    "kombu",
    "billiard",
    "dramatiq",
    "pika",
    "faststream",
    "taskiq",
    "taskiq-aio-pika",
    "aio-pika",
    "aiormq",
    "aiohttp",
    "asyncpg",
    "psycopg",
    "requests",
    "uvloop",
    "orjson",
    "py-spy",
)


def versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[name] = importlib.metadata.version(name)
    return found


async def server_versions(db: str, amqp: str) -> dict[str, str]:
    out = {}
    with contextlib.suppress(Exception):
        conn = await asyncpg.connect(db)
        out["postgresql"] = await conn.fetchval("SHOW server_version")
        # What changes PostgreSQL's figures most: durable commits, and whether anything vacuums
        # the queue tables (a 1,000,000-event backlog on a server with autovacuum off slows 5x).
        settings = await conn.fetch(
            "SELECT name, setting FROM pg_settings WHERE name = ANY($1::text[]) ORDER BY name",
            ["autovacuum", "fsync", "shared_buffers", "synchronous_commit"],
        )
        out["postgresql settings"] = ", ".join(f"{r['name']}={r['setting']}" for r in settings)
        await conn.close()
    with contextlib.suppress(Exception):
        connection = await aio_pika.connect(amqp)
        props = connection.transport.connection.server_properties  # type: ignore[union-attr]
        out["rabbitmq"] = str(props.get("version", "?"))
        await connection.close()
    return out


def code_under_test() -> dict[str, str]:
    """The commit measured, and any uncommitted change to the code under test."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args],
                capture_output=True,
                text=True,
                cwd=REPO,
                timeout=10,
                check=False,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""

    return {
        "commit": git("log", "-1", "--format=%h %s"),
        "uncommitted": git("status", "--short", "--", "delivery", "workers", "migrations"),
    }
