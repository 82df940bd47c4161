"""`delivery publish` on hostile and large input, the real command in a subprocess: each bad
line named with its reason and exit 2 with nothing written; a good file written whole, in
batches, with progress only on a terminal."""

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


def event(i: int, **change: object) -> bytes:
    body = {
        "id": f"evt_{i}",
        "type": "account.closed",
        "account_id": f"acc_{i % 3}",
        "data": {"reason": "requested"},
    }
    return json.dumps({**body, **change}).encode()


def publish(settings, data: bytes, tmp_path: Path) -> subprocess.CompletedProcess[bytes]:
    path = tmp_path / "events.jsonl"
    path.write_bytes(data)
    return subprocess.run(
        [sys.executable, "-m", "delivery", "publish", str(path)],
        capture_output=True,
        env=settings_env(settings),
        timeout=120,
        check=False,
    )


async def outbox_ids(settings) -> list[str]:
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT event_id FROM delivery.outbox ORDER BY pk")
        return [r["event_id"] for r in rows]
    finally:
        await conn.close()


async def test_hostile_lines_are_each_named_with_line_and_reason_and_nothing_is_written(
    settings, tmp_path: Path
):
    lines = [
        event(1),
        event(2).replace(b"requested", b"req\\u0000uested"),  # a NUL, escaped in the JSON
        event(3).replace(b"acc_0", b"acc\\u001b[2J"),  # a terminal escape in the account
        event(4).replace(b"requested", b"req\xffuested"),  # not UTF-8
        event(5)[:-1] + b', "type": "trade.cancelled"}',  # a duplicate key
        event(6, padding=" " * 1_000_000),  # over 1 MB
        event(7),
    ]
    column = lines[3].index(b"\xff") + 1
    result = publish(settings, b"\n".join(lines) + b"\n", tmp_path)
    assert result.returncode == 2
    stderr = result.stderr.decode()
    problems = stderr.splitlines()
    assert problems == [
        "delivery publish: line 2: data.reason: contains a control character (U+0000)",
        "delivery publish: line 3: account_id: contains a control character (U+001B)",
        f"delivery publish: line 4: is not valid UTF-8 (byte 0xff at column {column})",
        "delivery publish: line 5: invalid JSON: duplicate key 'type'",
        "delivery publish: line 6: is longer than 1 MB (1,000,000 bytes)",
        "delivery publish: 5 bad line(s); nothing was written",
    ]
    assert result.stdout == b""
    assert await outbox_ids(settings) == []


async def test_a_bad_last_line_after_several_batches_writes_nothing(settings, tmp_path: Path):
    # The check runs over the whole input before the first batch is written.
    lines = [event(i) for i in range(2500)] + [b"{"]
    result = publish(settings, b"\n".join(lines), tmp_path)
    assert result.returncode == 2
    assert b"line 2501: invalid JSON" in result.stderr
    assert await outbox_ids(settings) == []


async def test_a_file_of_several_batches_is_written_whole_in_order(settings, tmp_path: Path):
    lines = [event(i) for i in range(2500)] + [event(7)]  # one duplicate id
    result = publish(settings, b"\r\n".join(lines) + b"\r\n", tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"published": 2500, "duplicates": 1}
    assert result.stderr == b""  # no progress when standard error is not a terminal
    assert await outbox_ids(settings) == [f"evt_{i}" for i in range(2500)]


async def test_standard_input_is_read_as_bytes_and_published(settings):
    result = subprocess.run(
        [sys.executable, "-m", "delivery", "publish"],
        input=b"\xef\xbb\xbf" + event(1) + b"\n\n" + event(2),
        capture_output=True,
        env=settings_env(settings),
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"published": 2, "duplicates": 0}
    assert await outbox_ids(settings) == ["evt_1", "evt_2"]


async def test_progress_is_shown_on_a_terminal(settings, tmp_path: Path):
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(event(i) for i in range(12_000)))
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "delivery", "publish", str(path)],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=settings_env(settings),
        )
        os.close(follower)
        shown = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the command closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        stdout, _ = proc.communicate(timeout=120)
    finally:
        os.close(leader)
    assert proc.returncode == 0, shown
    assert json.loads(stdout) == {"published": 12_000, "duplicates": 0}
    assert b"checked lines: 10,000" in shown
    assert b"published: 12,000" in shown
