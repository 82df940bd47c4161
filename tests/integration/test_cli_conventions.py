"""The `delivery` command as Python users expect it, through the real CLI on the real services:
global options anywhere, `--debug` never changing the exit code, a purge that asks first, a
secret that never needs argv, one `status --json` shape, a warning for a mistyped setting."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest

from tests.support import settings_env

pytestmark = pytest.mark.integration

SECRET = "whsec_" + "A" * 43 + "="


def cli(
    settings, *args: str, stdin: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery", *args],
        input=stdin if stdin is not None else "",
        capture_output=True,
        text=True,
        env=settings_env(settings, **env),
        timeout=60,
        check=False,
    )


def add_subscription(settings, *extra: str, stdin: str | None = None):
    return cli(
        settings,
        "subscriptions",
        "add",
        "http://127.0.0.1:9/h",
        "--events",
        "*",
        *extra,
        stdin=stdin,
    )


# -- global options ---------------------------------------------------------------------------


async def test_json_and_debug_work_before_and_after_the_subcommand(settings):
    assert add_subscription(settings).returncode == 0
    before = cli(settings, "--json", "subscriptions", "list")
    after = cli(settings, "subscriptions", "list", "--json", "--debug")
    assert before.returncode == after.returncode == 0, before.stderr + after.stderr
    assert json.loads(before.stdout) == json.loads(after.stdout)
    assert len(json.loads(after.stdout)) == 1


@pytest.mark.parametrize("where", ["before", "after"])
async def test_debug_shows_the_traceback_and_keeps_the_exit_code(settings, where):
    args = ["subscriptions", "show", "sub_missing"]
    args = ["--debug", *args] if where == "before" else [*args, "--debug"]
    plain = cli(settings, "subscriptions", "show", "sub_missing")
    debug = cli(settings, *args)

    assert plain.returncode == debug.returncode == 2  # bad input, with or without --debug
    assert "Traceback" not in plain.stderr and "Traceback" in debug.stderr
    assert debug.stderr.strip().splitlines()[-1] == plain.stderr.strip()

    down = cli(settings, "status", "--debug", DELIVERY_DATABASE_URL="postgresql://u@127.0.0.1:1/x")
    assert down.returncode == 1 and "Traceback" in down.stderr


# -- dlq purge --------------------------------------------------------------------------------


async def _dead_letters(settings, n: int) -> None:
    added = add_subscription(settings)
    assert added.returncode == 0, added.stderr
    sub_id = json.loads(added.stdout)["id"]
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute(
            "INSERT INTO delivery.deliveries (event_id, subscription_id, state, dead_at,"
            " dead_reason) SELECT 'evt_' || g, $1, 'dead', now(), 'HTTP 400'"
            " FROM generate_series(1, $2) g",
            sub_id,
            n,
        )
    finally:
        await conn.close()


async def _dead_count(settings) -> int:
    conn = await asyncpg.connect(settings.database_url)
    try:
        return await conn.fetchval("SELECT count(*) FROM delivery.deliveries WHERE state='dead'")
    finally:
        await conn.close()


async def test_purge_without_a_terminal_needs_yes(settings):
    await _dead_letters(settings, 3)

    refused = cli(settings, "dlq", "purge", "--all")  # stdin is a pipe: nobody to ask
    assert refused.returncode == 2
    assert len(refused.stderr.strip().splitlines()) == 1 and "--yes" in refused.stderr
    assert await _dead_count(settings) == 3

    done = cli(settings, "dlq", "purge", "--all", "--yes")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"purged": 3}
    assert await _dead_count(settings) == 0


def purge_on_a_terminal(settings, answer: bytes) -> tuple[int, str, str]:
    """`dlq purge --all` with a terminal as standard input, answering ``answer`` once asked."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "delivery", "dlq", "purge", "--all"],
        stdin=terminal,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=settings_env(settings),
    )
    os.close(terminal)
    try:
        os.write(controller, answer)  # typed ahead: the terminal holds it until it is read
        out, err = proc.communicate(timeout=60)
    finally:
        os.close(controller)
    return proc.returncode, out.decode(), err.decode()


async def test_purge_on_a_terminal_asks_first(settings):
    await _dead_letters(settings, 2)

    code, out, err = purge_on_a_terminal(settings, b"n\n")
    assert code == 1 and "2 dead letter(s)" in err and "nothing was purged" in err
    assert out == "" and await _dead_count(settings) == 2

    code, out, err = purge_on_a_terminal(settings, b"y\n")
    assert code == 0, err
    assert json.loads(out) == {"purged": 2} and await _dead_count(settings) == 0


# -- secrets off the command line -------------------------------------------------------------


async def test_a_secret_comes_from_a_file_or_standard_input(settings, tmp_path: Path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    from_file = add_subscription(settings, "--secret-file", str(path))
    assert from_file.returncode == 0, from_file.stderr
    assert json.loads(from_file.stdout)["secret"] == SECRET

    from_stdin = add_subscription(settings, "--secret-file", "-", stdin=SECRET + "\n")
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert json.loads(from_stdin.stdout)["secret"] == SECRET


@pytest.mark.parametrize(
    ("args", "stdin", "expected"),
    [
        (["--secret-file", "/nonexistent/secret"], None, "--secret-file: /nonexistent/secret: "),
        (["--secret-file", "-"], "\n", "--secret-file: standard input is empty"),
        (["--secret-file", "-"], "nope\n", "secret: must start with whsec_"),
        (["--secret-file", "-", "--secret", SECRET], None, "not allowed with argument"),
    ],
)
async def test_a_bad_secret_file_is_one_line_exit_2(settings, args, stdin, expected):
    result = add_subscription(settings, *args, stdin=stdin)
    assert result.returncode == 2
    assert expected in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert json.loads(cli(settings, "subscriptions", "list", "--json").stdout) == []


# -- status -----------------------------------------------------------------------------------


async def test_status_json_keeps_its_shape_when_rabbitmq_is_unreachable(settings):
    up = cli(settings, "status", "--json")
    assert up.returncode == 0, up.stderr
    healthy = json.loads(up.stdout)

    down = cli(settings, "status", "--json", DELIVERY_AMQP_URL="amqp://guest:guest@127.0.0.1:1/")
    assert down.returncode == 1
    report = json.loads(down.stdout)
    assert report.keys() == healthy.keys()
    assert report["queues"].keys() == healthy["queues"].keys()
    assert healthy["ok"] is True and healthy["queues_error"] is None
    assert report["ok"] is False and report["queues_error"].startswith("unreachable: ")
    assert all(depth is None for depth in report["queues"].values())


# -- settings ---------------------------------------------------------------------------------


async def test_an_unknown_delivery_variable_is_warned_about(settings):
    result = cli(settings, "subscriptions", "list", "--json", DELIVERY_MAX_INFLIGHT="64")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == []  # the warning never reaches standard output
    assert result.stderr.strip() == (
        "delivery subscriptions: warning: DELIVERY_MAX_INFLIGHT is not a setting and is ignored"
        " (did you mean DELIVERY_MAX_IN_FLIGHT?)"
    )
