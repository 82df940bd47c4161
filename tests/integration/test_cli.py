"""The real `delivery` command in a subprocess: exit codes, one-line errors, nothing written
on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from delivery.testing.env import environment_without_settings
from tests.support import settings_env

pytestmark = pytest.mark.integration

GOOD = json.dumps(
    {"type": "account.closed", "account_id": "acc_1", "data": {"reason": "requested"}}
)


def cli(
    settings, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=settings_env(settings, **env),
        timeout=60,
        check=False,
    )


async def outbox_count(settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM delivery.outbox")
    finally:
        await conn.close()


async def test_publish_reads_json_lines_and_reports_counts(settings, tmp_path: Path):
    path = tmp_path / "events.jsonl"
    dup = json.dumps(
        {"id": "evt_same", "type": "account.closed", "account_id": "a", "data": {"reason": "x"}}
    )
    path.write_text("\n".join([GOOD, dup, "", dup]) + "\n")
    result = cli(settings, "publish", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"published": 2, "duplicates": 1}
    again = cli(settings, "publish", stdin=dup + "\n")
    assert json.loads(again.stdout) == {"published": 0, "duplicates": 1}
    assert await outbox_count(settings) == 2


@pytest.mark.parametrize(
    ("bad_line", "expected"),
    [
        ("{not json", "line 2: invalid JSON"),
        (
            json.dumps({"type": "trade.exploded", "account_id": "a", "data": {}}),
            "line 2: type: unknown event type 'trade.exploded'",
        ),
        (
            json.dumps({"type": "account.closed", "data": {"reason": "x"}}),
            "line 2: account_id: is required",
        ),
        (
            json.dumps(
                {
                    "type": "account.balance_changed",
                    "account_id": "a",
                    "data": {"asset": "USD", "delta": 1.5, "balance": "2", "reason": "fee"},
                }
            ),
            "line 2: data.delta: must be a decimal string",
        ),
        ("[1, 2]", "line 2: an event must be a JSON object"),
    ],
)
async def test_a_bad_line_exits_2_names_the_line_and_writes_nothing(settings, bad_line, expected):
    result = cli(settings, "publish", stdin="\n".join([GOOD, bad_line, GOOD]) + "\n")
    assert result.returncode == 2
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().endswith("nothing was written")
    assert await outbox_count(settings) == 0


async def test_every_bad_line_is_named(settings):
    result = cli(settings, "publish", stdin="\n".join(["{", GOOD, "{"]) + "\n")
    assert result.returncode == 2
    assert "line 1:" in result.stderr and "line 3:" in result.stderr
    assert "2 bad line(s)" in result.stderr


async def test_subscriptions_lifecycle(settings):
    added = cli(
        settings,
        "subscriptions",
        "add",
        "http://127.0.0.1:9/hook",
        "--events",
        "trade.*,account.closed",
        "--account",
        "acc_9",
        "--retry-schedule",
        "1s,10s",
    )
    assert added.returncode == 0, added.stderr
    sub = json.loads(added.stdout)
    assert sub["id"].startswith("sub_") and sub["secret"].startswith("whsec_")
    assert sub["event_patterns"] == ["trade.*", "account.closed"] and sub["account_id"] == "acc_9"
    assert sub["retry_schedule"] == "1s,10s"

    listed = json.loads(cli(settings, "subscriptions", "list", "--json").stdout)
    assert [s["id"] for s in listed] == [sub["id"]] and "secret" not in listed[0]

    disabled = json.loads(cli(settings, "subscriptions", "disable", sub["id"], "--json").stdout)
    assert disabled["state"] == "disabled"
    enabled = json.loads(cli(settings, "subscriptions", "enable", sub["id"], "--json").stdout)
    assert enabled["state"] == "active"

    rotated = json.loads(cli(settings, "subscriptions", "rotate-secret", sub["id"]).stdout)
    assert rotated["secret"] != sub["secret"] and rotated["previous_secret_expires_at"]

    shown = cli(settings, "subscriptions", "show", sub["id"])
    assert shown.returncode == 0 and sub["id"] in shown.stdout

    assert cli(settings, "subscriptions", "remove", sub["id"]).returncode == 0
    missing = cli(settings, "subscriptions", "show", sub["id"])
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["not-a-url", "--events", "*"], "url: 'not-a-url' is not an http(s) URL"),
        (["ftp://h/x", "--events", "*"], "url:"),
        (
            ["http://h/x", "--events", "trade.exectued"],
            "events: 'trade.exectued' matches no known event type",
        ),
        (["http://h/x", "--events", "*", "--secret", "nope"], "secret: must start with whsec_"),
        (["http://h/x", "--events", "*", "--retry-schedule", "5s,soon"], "--retry-schedule:"),
        (["http://h/x"], "the following arguments are required: --events"),
    ],
)
async def test_bad_subscription_input_exits_2_with_one_line(settings, args, expected):
    result = cli(settings, "subscriptions", "add", *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert json.loads(cli(settings, "subscriptions", "list", "--json").stdout) == []


async def test_missing_configuration_is_one_line(settings):
    result = subprocess.run(
        [sys.executable, "-m", "delivery", "status"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={k: v for k, v in settings_env(settings).items() if k != "DELIVERY_DATABASE_URL"},
    )
    assert result.returncode == 2
    assert result.stderr.strip() == "delivery status: DELIVERY_DATABASE_URL is not set"


async def test_unreachable_database_is_one_line_exit_1(settings):
    result = cli(settings, "status", DELIVERY_DATABASE_URL="postgresql://postgres@127.0.0.1:1/x")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


async def test_migrate_is_safe_twice_and_concurrently(services, tmp_path):
    from delivery.testing.services import create_database, drop_database

    name = "dlv_mig_" + tmp_path.name[-8:].lower().replace("-", "_")
    url = await create_database(services.database_url, name)
    try:
        env = {"DELIVERY_DATABASE_URL": url}
        base = settings_env_for_url(url)
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "delivery", "migrate"],
                env=base,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=60) for p in procs]
        assert all(p.returncode == 0 for p in procs), outputs
        applied = [json.loads(out)["applied"] for out, _err in outputs]
        assert sorted(len(a) for a in applied)[0] == 0  # one did the work, the other found it done
        assert len(max(applied, key=len)) >= 3
        third = subprocess.run(
            [sys.executable, "-m", "delivery", "migrate"],
            env=base,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert json.loads(third.stdout) == {"applied": []}
        del env
    finally:
        await drop_database(services.database_url, name)


def settings_env_for_url(url: str) -> dict[str, str]:
    env = environment_without_settings()
    env["DELIVERY_DATABASE_URL"] = url
    return env


async def test_a_test_only_switch_without_the_harness_exits_2_with_one_line(settings):
    result = cli(settings, "worker", DELIVERY_DANGEROUS_ACK_BEFORE_COMMIT="1")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "delivery worker: DELIVERY_DANGEROUS_ACK_BEFORE_COMMIT: a test-only switch, refused "
        "unless DELIVERY_TEST_HARNESS=true (set only by test harnesses)"
    )
