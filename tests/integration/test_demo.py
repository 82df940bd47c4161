"""The README's first command works: the demo delivers everything and verifies every signature."""

from __future__ import annotations

import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from decimal import Decimal

import pytest

from delivery.demo.scenario import (
    ACCOUNTS,
    ROUTES,
    STREAMED_ACCOUNTS,
    WATCHED_ACCOUNT,
    realistic_events,
)
from delivery.demo.summary import OK_LINE
from delivery.outbox import validate_all
from delivery.store.migrations import DEFAULT_MIGRATIONS_DIR
from delivery.testing.env import environment_without_settings


def test_demo_events_are_valid_and_realistic():
    events = realistic_events(500, random.Random(1))

    parsed = validate_all(events)  # raises on any invalid event

    assert len(parsed) == 500
    assert [e["type"] for e in events[: len(ACCOUNTS)]] == ["account.created"] * len(ACCOUNTS)
    assert {"trade.executed", "trade.cancelled", "account.balance_changed"} <= set(
        Counter(e["type"] for e in events)
    )
    for account in ACCOUNTS:  # every balance is the opening balance plus the deltas so far
        balance = Decimal("10000.00")
        for event in events:
            if event["type"] == "account.balance_changed" and event["account_id"] == account:
                balance += Decimal(event["data"]["delta"])
                assert Decimal(event["data"]["balance"]) == balance >= 0


@pytest.mark.integration
def test_demo_delivers_every_event_with_verified_signatures(services):
    env = environment_without_settings()
    # The session's services: the demo then works in a database and queue prefix of its own.
    env.update(DELIVERY_DATABASE_URL=services.database_url, DELIVERY_AMQP_URL=services.amqp_url)
    env["COLUMNS"] = "80"  # the progress display fits an 80-column terminal
    result = _demo(env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert OK_LINE in result.stdout.splitlines()
    assert "Traceback" not in result.stderr
    for route in ROUTES:
        assert route.name in result.stdout
    assert "published 300 events" in result.stdout
    progress = [line for line in result.stderr.splitlines() if " delivered" in line]
    assert progress, result.stderr
    assert all(len(line) < 80 for line in progress), progress
    # The watched account's live balance (from the stream) beside the counts, by the end
    assert re.search(rf"{WATCHED_ACCOUNT} balance [\d,]+\.\d\d USD$", progress[-1]), progress
    # and every followed account's rebuilt balances checked against the API's snapshot
    out = result.stdout.splitlines()
    start = out.index("live balances (rebuilt from the stream) = the API's snapshot:")
    checked = out[start + 1 : start + 1 + len(STREAMED_ACCOUNTS)]
    assert [line.split()[0] for line in checked] == list(STREAMED_ACCOUNTS), out
    assert all(re.fullmatch(r"\S+  [\d,]+\.\d\d USD at sequence \d+", s.strip()) for s in checked)


@pytest.mark.integration
def test_demo_migrates_from_delivery_migrations_dir(services, tmp_path):
    # A copy of the migrations plus one that fails on purpose: the demo fails on it only if it
    # migrates from the directory the variable names.
    migrations = tmp_path / "migrations"
    shutil.copytree(DEFAULT_MIGRATIONS_DIR, migrations)
    (migrations / "0999_fails_on_purpose.sql").write_text("SELECT 1 / 0;\n")
    env = environment_without_settings()
    env.update(
        DELIVERY_DATABASE_URL=services.database_url,
        DELIVERY_AMQP_URL=services.amqp_url,
        DELIVERY_MIGRATIONS_DIR=str(migrations),
    )
    result = _demo(env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "division by zero" in result.stderr
    assert "Traceback" not in result.stderr


def _demo(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", "demo", "--events", "300"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
