"""`delivery tenants`, `delivery keys` and `--tenant` in a subprocess: what they print, what they
store (a key only as its SHA-256), exit codes and one-line errors."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import asyncpg
import pytest

from delivery.store import keys
from delivery.testing.factories import trade
from tests.support import settings_env

pytestmark = pytest.mark.integration


def cli(settings, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=settings_env(settings),
        timeout=60,
        check=False,
    )


def ok(settings, *args: str, stdin: str | None = None) -> object:
    result = cli(settings, *args, stdin=stdin)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def refused(settings, *args: str, stdin: str | None = None) -> str:
    """The one stderr line of a command that exits 2."""
    result = cli(settings, *args, stdin=stdin)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    return result.stderr


async def test_tenants_add_list_and_show(settings):
    added = ok(settings, "tenants", "add", "acme", "--max-subscriptions", "3")
    assert added["id"].startswith("ten_") and added["name"] == "acme"
    assert added["max_subscriptions"] == 3 and added["max_events_per_s"] is None

    listed = ok(settings, "tenants", "list", "--json")
    assert [(t["id"], t["name"]) for t in listed] == [
        ("default", "default"),
        (added["id"], "acme"),
    ]
    assert ok(settings, "tenants", "show", added["id"], "--json") == added
    table = cli(settings, "tenants", "list")
    assert table.returncode == 0 and "acme" in table.stdout and added["id"] in table.stdout

    assert "a tenant named 'acme' exists already" in refused(settings, "tenants", "add", "acme")
    assert "max_events_per_s: must be between 1 and 1,000,000" in refused(
        settings, "tenants", "add", "fast", "--max-events-per-s", "2000000"
    )
    assert "does not exist" in refused(settings, "tenants", "show", "ten_nobody")
    assert "is not a tenant id" in refused(settings, "tenants", "show", "no such")
    assert len(ok(settings, "tenants", "list", "--json")) == 2  # the refusals wrote nothing


async def test_a_key_is_shown_once_and_stored_only_as_its_sha256(settings):
    tenant = ok(settings, "tenants", "add", "acme")
    created = ok(settings, "keys", "create", tenant["id"], "--scopes", "publish,read")
    key = created["key"]
    assert created["id"].startswith("key_") and key.startswith("dk_")
    assert created["scopes"] == ["publish", "read"] and created["tenant_id"] == tenant["id"]

    listing = cli(settings, "keys", "list", tenant["id"], "--json")
    assert listing.returncode == 0 and key not in listing.stdout
    (listed,) = json.loads(listing.stdout)
    assert listed["id"] == created["id"] and listed["revoked_at"] is None

    conn = await asyncpg.connect(settings.database_url)
    try:
        row = await conn.fetchrow("SELECT * FROM delivery.api_keys")
        assert row["key_hash"] == hashlib.sha256(key.encode()).digest()
        assert not any(key in str(value) for value in row.values())
        assert (await keys.authenticate(conn, key)).tenant_id == tenant["id"]

        revoked = ok(settings, "keys", "revoke", created["id"])
        assert revoked["id"] == created["id"] and revoked["revoked_at"] is not None
        assert await keys.authenticate(conn, key) is None
    finally:
        await conn.close()
    (after,) = ok(settings, "keys", "list", tenant["id"], "--json")
    assert after["revoked_at"] == revoked["revoked_at"]

    assert "'admin' is not one of publish, manage, read" in refused(
        settings, "keys", "create", tenant["id"], "--scopes", "read,admin"
    )
    assert "tenant 'ten_nobody' does not exist" in refused(settings, "keys", "create", "ten_nobody")
    assert "tenant 'ten_nobody' does not exist" in refused(settings, "keys", "list", "ten_nobody")
    assert "key 'key_0000000000000000' does not exist" in refused(
        settings, "keys", "revoke", "key_0000000000000000"
    )
    assert "is not a key id" in refused(settings, "keys", "revoke", "dk_oops")
    assert len(ok(settings, "keys", "list", tenant["id"], "--json")) == 1


async def test_tenant_option_scopes_publish_subscriptions_and_dead_letters(settings):
    tenant = ok(settings, "tenants", "add", "acme", "--max-subscriptions", "1")
    t = tenant["id"]
    sub = ok(settings, "subscriptions", "add", "http://127.0.0.1:9/h", "--events", "*", "--tenant", t)
    assert sub["tenant_id"] == t
    assert [s["id"] for s in ok(settings, "subscriptions", "list", "--tenant", t, "--json")] == [
        sub["id"]
    ]
    assert ok(settings, "subscriptions", "list", "--json") == []
    # Another tenant's subscription reads as a missing one.
    missing = refused(settings, "subscriptions", "show", sub["id"])
    assert f"subscription {sub['id']!r} does not exist" in missing
    assert ok(settings, "subscriptions", "show", sub["id"], "--tenant", t, "--json")["id"] == sub["id"]

    quota = refused(
        settings, "subscriptions", "add", "http://127.0.0.1:9/g", "--events", "*", "--tenant", t
    )
    assert "max_subscriptions 1" in quota
    assert "tenant 'ten_nobody' does not exist" in refused(
        settings, "subscriptions", "list", "--tenant", "ten_nobody"
    )

    line = json.dumps(trade(1, id="evt_t1"))
    assert ok(settings, "publish", "--tenant", t, stdin=line + "\n") == {
        "published": 1,
        "duplicates": 0,
    }
    taken = refused(settings, "publish", stdin=line + "\n")
    assert "'evt_t1' is already used by another tenant" in taken
    assert "tenant 'ten_nobody' does not exist" in refused(
        settings, "publish", "--tenant", "ten_nobody", stdin=line + "\n"
    )
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT event_id, tenant_id FROM delivery.outbox")
    finally:
        await conn.close()
    assert [tuple(r) for r in rows] == [("evt_t1", t)]

    assert ok(settings, "dlq", "list", "--tenant", t, "--json") == []
    assert f"subscription {sub['id']!r} does not exist" in refused(
        settings, "dlq", "list", "--subscription", sub["id"]
    )
    assert ok(settings, "dlq", "replay", "--all", "--tenant", t) == {
        "replayed": 0,
        "skipped_disabled_subscription": 0,
    }
    assert "tenant 'ten_nobody' does not exist" in refused(
        settings, "dlq", "purge", "--all", "--yes", "--tenant", "ten_nobody"
    )

    status = cli(settings, "status", "--json")
    (shown,) = json.loads(status.stdout)["subscriptions"]
    assert shown["id"] == sub["id"] and shown["tenant_id"] == t
    (row,) = [line for line in cli(settings, "status").stdout.splitlines() if sub["id"] in line]
    assert row.split()[-1] == t
