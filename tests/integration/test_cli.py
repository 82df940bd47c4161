"""The real `delivery` command in a subprocess: exit codes, one-line errors, nothing written
on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest

from delivery import publish_many
from delivery.testing.env import environment_without_settings
from delivery.testing.factories import add_subscription, trade
from delivery.testing.receiver import Receiver
from tests.support import run_until_idle, settings_env

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
    assert missing.returncode == 2 and "was removed" in missing.stderr
    assert json.loads(cli(settings, "subscriptions", "list", "--json").stdout) == []


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
        # Bounds: each of these was written (or written, then failed) before.
        (
            ["http://h/x", "--events", "*", "--retry-schedule", "5s,200000000d"],
            "--retry-schedule: a retry step of 200000000d is not between 0s and 7d",
        ),
        (
            ["http://h/x", "--events", "*", "--retry-schedule", "9" * 400 + "s"],
            "--retry-schedule: ",
        ),
        (
            ["http://h/x", "--events", "*", "--retry-schedule", ",".join(["1s"] * 51)],
            "--retry-schedule: a retry schedule has 1 to 50 steps, not 51",
        ),
        (["http://h/x", "--events", "*", "--retry-schedule", ""], "--retry-schedule: "),
        (["http://h/x", "--events", "*", "--timeout", "nan"], "timeout: must be between"),
        (["http://h/x", "--events", "*", "--timeout", "inf"], "timeout: must be between"),
        (["http://u:s3cret@h/x", "--events", "*"], "url: 'http://***@h/x' contains credentials"),
        (["http://h/x\x07y", "--events", "*"], "control characters"),
        (["http://h/x\u200by", "--events", "*"], "non-ASCII"),
        (["http://h/" + "x" * 2100, "--events", "*"], "url: longer than 2048 characters"),
        (["http://h/x", "--events", "*", "--account", ""], "account: "),
        (["http://h/x", "--events", "*", "--account", "a" * 129], "account: "),
        (
            ["http://h/x", "--events", "*", "--secret", "whsec_" + "QUFB" * 7],
            "secret: must hold at least 24 random bytes",
        ),
        (
            ["http://h/x", "--events", "*", "--secret", "whsec_" + "QUFB" * 22],
            "secret: must hold at most 64 bytes",
        ),
    ],
)
async def test_bad_subscription_input_exits_2_with_one_line(settings, args, expected):
    result = cli(settings, "subscriptions", "add", *args)
    assert result.returncode == 2
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "s3cret" not in result.stderr
    assert await subscription_rows(settings) == 0  # nothing was written


async def subscription_rows(settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM delivery.subscriptions")
    finally:
        await conn.close()


# Only parsed and classified, never connected to: the guard refuses before any request.
@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/h",
        "http://localhost:9/h",  # a name that resolves to loopback
        "http://2130706433/h",  # decimal
        "http://0177.0.0.1/h",  # octal
        "http://0x7f.1/h",  # hex, short
        "http://127.1/h",  # short
        "http://[::1]/h",
        "http://[::ffff:127.0.0.1]/h",  # IPv4-mapped
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://10.0.0.7/h",
        "http://[fd12::1]/h",  # unique-local
        "http://0.0.0.0/h",
        "http://224.0.0.1/h",  # multicast
    ],
)
async def test_private_targets_are_refused_when_a_subscription_is_made(settings, url):
    result = cli(
        settings,
        "subscriptions",
        "add",
        url,
        "--events",
        "*",
        DELIVERY_ALLOW_PRIVATE_TARGETS="false",
    )
    assert result.returncode == 2, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "Traceback" not in line
    assert line.startswith("delivery subscriptions: url: 'http") and "is refused" in line
    assert await subscription_rows(settings) == 0


@pytest.mark.parametrize(
    ("command", "variable", "value"),
    [
        ("worker", "DELIVERY_HTTP_TIMEOUT_S", "inf"),
        ("relay", "DELIVERY_HTTP_CONNECT_TIMEOUT_S", "nan"),
        ("status", "DELIVERY_SECRET_ROTATION_GRACE_S", "1e12"),
        ("run", "DELIVERY_DELIVERY_LEASE_S", "-1"),
        ("worker", "DELIVERY_RETRY_SCHEDULE", "5s,200000000d"),
        ("worker", "DELIVERY_MAX_IN_FLIGHT", "1e3"),
    ],
)
async def test_an_out_of_range_setting_stops_start_up_naming_it(settings, command, variable, value):
    result = cli(settings, command, **{variable: value})
    assert result.returncode == 2
    assert result.stderr.startswith(f"delivery {command}: {variable}: ")
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["dlq", "replay", "\u00b2"], "is not a number"),  # isdigit() said yes, int() no
        (["dlq", "purge", "\u0661\u0662"], "is not a number"),  # Arabic-Indic digits
        (["dlq", "replay", "1" * 30], "is not a number"),  # past bigint
        (["dlq", "list", "--limit", "-1"], "--limit: "),
        (["dlq", "list", "--limit", "0"], "--limit: "),
        (["dlq", "list", "--limit", "100000000"], "--limit: "),
        (["dlq", "list", "--limit", "1_000"], "--limit: "),
        (["dlq", "list", "--subscription", "sub_00000000deadbeef"], "does not exist"),
        (["dlq", "replay", "--subscription", "sub_00000000deadbeef"], "does not exist"),
        (["dlq", "purge", "--subscription", "sub_00000000deadbeef"], "does not exist"),
        (["subscriptions", "show", "sub_00000000deadbeef"], "does not exist"),
        (["subscriptions", "remove", "sub_00000000deadbeef"], "does not exist"),
        (["subscriptions", "disable", "../etc/passwd"], "is not a subscription id"),
        (["subscriptions", "rotate-secret", "sub_x\n"], "is not a subscription id"),
    ],
)
async def test_ids_are_parsed_strictly_and_an_unknown_one_exits_2(settings, args, expected):
    result = cli(settings, *args)
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


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


async def test_remove_keeps_the_history_unless_asked_not_to(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            sub = await add_subscription(conn, receiver, "/h", patterns="*")
            await publish_many(conn, [trade(1, id="evt_before")])
            await run_until_idle(settings)
            # A delivery still pending when the subscription goes (its event not relayed yet).
            await conn.execute(
                "INSERT INTO delivery.deliveries (event_id, subscription_id) VALUES ('evt_p', $1)",
                sub.id,
            )
            removed = cli(settings, "subscriptions", "remove", sub.id, "--json")
            assert removed.returncode == 0, removed.stderr
            assert json.loads(removed.stdout) == {"removed": sub.id, "history": "kept"}
            history = await conn.fetch(
                "SELECT d.event_id, d.state, d.dead_reason, count(a.id) AS attempts"
                " FROM delivery.deliveries d LEFT JOIN delivery.attempts a ON a.delivery_id = d.id"
                " GROUP BY d.id ORDER BY d.event_id"
            )
            assert [tuple(r) for r in history] == [
                ("evt_before", "delivered", None, 1),
                ("evt_p", "dead", "subscription removed by operator", 0),
            ]
            # Gone for every purpose but its history: no new deliveries, not listed, not acted on.
            await publish_many(conn, [trade(2, id="evt_after")])
            await run_until_idle(settings)
            assert receiver.unique_ids("/h") == {"evt_before"}
            assert await conn.fetchval("SELECT count(*) FROM delivery.deliveries") == 2
            assert json.loads(cli(settings, "subscriptions", "list", "--json").stdout) == []
            enable = cli(settings, "subscriptions", "enable", sub.id)
            assert enable.returncode == 2 and "was removed" in enable.stderr
            assert cli(settings, "dlq", "list", "--subscription", sub.id).returncode == 0

            purged = cli(settings, "subscriptions", "remove", sub.id, "--delete-history")
            assert purged.returncode == 0, purged.stderr
            assert await conn.fetchval("SELECT count(*) FROM delivery.deliveries") == 0
            assert await conn.fetchval("SELECT count(*) FROM delivery.attempts") == 0
            assert await subscription_rows(settings) == 0
    finally:
        await conn.close()


async def test_pause_resume_and_replay_a_window_from_the_command_line(settings):
    added = cli(settings, "subscriptions", "add", "http://127.0.0.1:9/hook", "--events", "*")
    sub_id = json.loads(added.stdout)["id"]
    paused = cli(settings, "subscriptions", "pause", sub_id, "--json")
    assert paused.returncode == 0, paused.stderr
    assert json.loads(paused.stdout)["state"] == "paused"
    # `status` shows it (exit 1 or 0 depending on the broker; the report is the same shape).
    report = json.loads(cli(settings, "status", "--json").stdout)
    assert [s["state"] for s in report["subscriptions"]] == ["paused"]
    text = cli(settings, "status").stdout
    assert f"{sub_id} paused" in " ".join(text.split())

    published = cli(settings, "publish", stdin=GOOD + "\n" + GOOD + "\n")
    assert published.returncode == 0, published.stderr
    replayed = cli(
        settings,
        "subscriptions",
        "replay",
        sub_id,
        "--since",
        "2020-01-01T00:00:00Z",
        "--until",
        "2020-01-31T00:00:00+01:00",
    )
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout) == {"replayed": 0}
    now = datetime.now(UTC)
    window = ["--since", (now - timedelta(days=1)).isoformat(), "--until", now.isoformat()]
    replayed = cli(settings, "subscriptions", "replay", sub_id, *window)
    assert json.loads(replayed.stdout) == {"replayed": 2}

    resumed = cli(settings, "subscriptions", "resume", sub_id, "--json")
    assert json.loads(resumed.stdout)["state"] == "active"

    for args, expected in (
        (["replay", sub_id, "--since", "yesterday", "--until", now.isoformat()], "--since: "),
        (["replay", sub_id, "--since", "2026-01-01T00:00:00", "--until", "2026-01-02"], "RFC"),
        (["replay", sub_id, "--since", "2026-01-01T00:00:00Z", "--until", "2026-03-01T00:00Z"],
         "at most 31 days"),
        (["replay", sub_id, "--since", "2026-01-01T00:00:00Z"], "required: --until"),
        (["pause", "sub_nobody"], "does not exist"),
    ):
        result = cli(settings, "subscriptions", *args)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and result.stderr.count("\n") == 1, result.stderr
    cli(settings, "subscriptions", "disable", sub_id)
    refused = cli(settings, "subscriptions", "pause", sub_id)
    assert refused.returncode == 2 and "enable it first" in refused.stderr
