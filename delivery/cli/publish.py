"""``delivery publish [FILE]``: every line is checked before anything is written, then all of
them are written in one transaction, or none.

Memory stays flat whatever the input's size: the checking pass streams the input (a file or
standard input, read as bytes) and spools each validated event to a temporary file instead of
holding it, then the writing pass reads the spool back in batches inside one transaction. The
spool keeps the ids and times the checking pass assigned, so nothing is validated twice.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime
from typing import IO, BinaryIO

import orjson

from delivery.cli.lines import read_events
from delivery.cli.output import EXIT_OK, EXIT_USAGE, _emit, _progress
from delivery.errors import InputError
from delivery.events import NewEvent
from delivery.settings import Settings

_BATCH_EVENTS = 1000
_CHECK_PROGRESS_EVERY_LINES = 10_000


async def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store.tenants import DEFAULT_TENANT, parse_tenant_id

    # Checked as typed before the input is read; whether it exists, when writing (nothing is).
    tenant = parse_tenant_id(args.tenant if args.tenant is not None else DEFAULT_TENANT)
    with contextlib.ExitStack() as stack:
        stream = _open_input(args.file, stack)
        spool = stack.enter_context(tempfile.TemporaryFile())
        count, bad = _check(stream, spool)
        if bad:
            sys.stderr.write(f"delivery publish: {bad} bad line(s); nothing was written\n")
            return EXIT_USAGE
        spool.seek(0)
        published, duplicates = await _write(settings.database_url, spool, count, tenant)
    _emit({"published": published, "duplicates": duplicates})
    return EXIT_OK


def _open_input(name: str | None, stack: contextlib.ExitStack) -> BinaryIO:
    if name in (None, "-"):
        return sys.stdin.buffer
    try:
        return stack.enter_context(open(name, "rb"))
    except OSError as exc:
        raise InputError(f"{name}: {exc.strerror}") from None


def _check(stream: BinaryIO, spool: IO[bytes]) -> tuple[int, int]:
    """Validate every line, naming each bad one on stderr as it is found, and spool the good
    ones: ``(events, bad lines)``."""
    tty = sys.stderr.isatty()
    # On a terminal the progress line is erased first, so a problem stands on a line of its own.
    erase = "\r\x1b[K" if tty else ""
    report = _progress("checked lines")
    count = bad = 0
    number = 0
    for number, outcome in read_events(stream):
        if isinstance(outcome, InputError):
            bad += 1
            sys.stderr.write(f"{erase}delivery publish: {outcome}\n")
        elif not bad:  # after a bad line nothing will be written: only the checking goes on
            count += 1
            spool.write(_spooled(outcome))
        if number % _CHECK_PROGRESS_EVERY_LINES == 0:
            report(number)
    if tty and number >= _CHECK_PROGRESS_EVERY_LINES:
        report(number)
        sys.stderr.write("\n")
    return count, bad


async def _write(
    database_url: str, spool: IO[bytes], count: int, tenant: str
) -> tuple[int, int]:
    import asyncpg

    from delivery.outbox import publish_validated

    report = _progress("published")
    published = duplicates = 0
    conn = await asyncpg.connect(database_url)
    try:
        # One transaction for the whole input: all lines are written, or none.
        async with conn.transaction():
            for batch in _batches(spool):
                result = await publish_validated(conn, batch, tenant=tenant)
                published += len(result.published)
                duplicates += len(result.duplicates)
                report(published + duplicates)
    finally:
        await conn.close()
    if sys.stderr.isatty() and count > _BATCH_EVENTS:
        sys.stderr.write("\n")
    return published, duplicates


def _spooled(event: NewEvent) -> bytes:
    return orjson.dumps(
        [event.id, event.type, event.account_id, event.occurred_at, event.data, event.traceparent]
    ) + b"\n"


def _batches(spool: IO[bytes]) -> Iterator[list[NewEvent]]:
    """The spool back as events, ``_BATCH_EVENTS`` at a time (they were validated on the way in)."""
    batch: list[NewEvent] = []
    for line in spool:
        id_, type_, account_id, occurred_at, data, traceparent = orjson.loads(line)
        occurred = datetime.fromisoformat(occurred_at)
        batch.append(NewEvent(id_, type_, account_id, occurred, data, traceparent))
        if len(batch) == _BATCH_EVENTS:
            yield batch
            batch = []
    if batch:
        yield batch
