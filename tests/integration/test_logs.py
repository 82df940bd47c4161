"""The log of a real `delivery worker`: with JSON on, every line of standard error is a JSON
object with a `logger` field, the libraries' own records included; trace ids when tracing is
on; no colours under NO_COLOR; levels in any case."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import signal
import sys
from collections.abc import AsyncIterator

import asyncpg
import pytest

from delivery import publish
from delivery.store import subscriptions
from delivery.testing.factories import trade
from delivery.testing.receiver import Behaviour, Receiver
from delivery.testing.waits import wait_until
from tests.support import settings_env, start_worker

pytestmark = pytest.mark.integration

# A port nothing listens on: the worker's connection attempts fail at once, and aiormq logs
# "error when creating transport" through the standard library.
UNREACHABLE_AMQP = "amqp://guest:guest@127.0.0.1:1/"
STORED = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@contextlib.asynccontextmanager
async def process(
    settings, command: str = "worker", **env: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, list]]:
    """`delivery <command>` with stderr read line by line into a list, killed on the way out."""
    proc = await start_worker(settings, command, **env)
    lines: list[bytes] = []

    async def read() -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            lines.append(line)

    reader = asyncio.ensure_future(read())
    try:
        yield proc, lines
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await asyncio.wait_for(reader, 10)


def parse_all(lines: list[bytes]) -> list[dict]:
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            pytest.fail(f"a log line that is not JSON: {line!r}")
    return records


async def test_a_json_log_is_all_json_library_records_included(settings):
    async with process(
        settings,
        DELIVERY_AMQP_URL=UNREACHABLE_AMQP,
        DELIVERY_LOG_FORMAT="JSON",  # any case
        DELIVERY_LOG_LEVEL="Info",
        DELIVERY_MAX_INFLIGHT="64",  # a typo: warned about in the log, in its format
    ) as (proc, lines):
        await wait_until(
            lambda: (
                any(b"error when creating transport" in line for line in lines)
                or proc.returncode is not None
            ),
            timeout_s=30,
            what="aiormq's connection error",
        )
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0, b"".join(lines).decode()

    records = parse_all(lines)
    assert all(isinstance(r.get("logger"), str) and r["logger"] for r in records), records
    from_aiormq = [r for r in records if "error when creating transport" in r["event"]]
    assert from_aiormq and all(r["logger"].startswith("aiormq") for r in from_aiormq)
    assert all(r["level"] == "error" and "timestamp" in r for r in from_aiormq)
    ours = {r["logger"] for r in records if r["event"] == "amqp_connect_retry"}
    assert ours == {"delivery.amqp"}
    [typo] = [r for r in records if r["event"] == "unknown_setting"]
    assert "did you mean DELIVERY_MAX_IN_FLIGHT?" in typo["warning"]
    assert typo["level"] == "warning"


async def test_attempt_lines_carry_the_trace_and_span_ids_when_tracing_is_on(settings):
    conn = await asyncpg.connect(settings.database_url)
    try:
        async with Receiver() as receiver:
            receiver.set_behaviour("/h", Behaviour(status=503))
            await subscriptions.add(conn, url=receiver.url("/h"), patterns="*")
            await publish(conn, trade(1, id="evt_traced", traceparent=STORED))
            async with process(
                settings,
                "run",
                DELIVERY_LOG_LEVEL="info",
                DELIVERY_OTEL_ENABLED="true",
                # Nothing is exported while the test runs (the process is killed at the end).
                OTEL_BSP_SCHEDULE_DELAY="600000",
                OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:1",
            ) as (_proc, lines):
                await wait_until(
                    lambda: any(b'"attempt_failed"' in line for line in lines),
                    timeout_s=60,
                    what="a failed attempt's log line",
                )
                arrival = receiver.arrivals[0]
    finally:
        await conn.close()

    records = parse_all(lines)
    first = next(r for r in records if r["event"] == "attempt_failed" and r["attempt"] == 1)
    _version, trace_id, span_id, _flags = arrival.traceparent.split("-")
    assert trace_id == STORED.split("-")[1]  # the producer's trace, continued
    assert (first["trace_id"], first["span_id"]) == (trace_id, span_id)  # the attempt's span


async def _console_output(settings, **env: str) -> bytes:
    """Standard error of a worker whose stderr is a terminal, until its first retry line."""
    controller, terminal = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "delivery",
        "worker",
        env=settings_env(
            settings, DELIVERY_AMQP_URL=UNREACHABLE_AMQP, DELIVERY_LOG_FORMAT="console", **env
        ),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=terminal,
    )
    os.close(terminal)
    seen = bytearray()
    loop = asyncio.get_running_loop()
    try:
        while b"amqp_connect_retry" not in seen:
            chunk = await asyncio.wait_for(
                loop.run_in_executor(None, os.read, controller, 4096), 30
            )
            if not chunk:
                break
            seen += chunk
    finally:
        proc.kill()
        await proc.wait()
        os.close(controller)
    return bytes(seen)


async def test_no_color_turns_the_consoles_colours_off(settings):
    coloured = await _console_output(settings)
    plain = await _console_output(settings, NO_COLOR="1")

    assert b"amqp_connect_retry" in coloured and b"\x1b[" in coloured  # a terminal: colours
    assert b"amqp_connect_retry" in plain and b"\x1b[" not in plain
