"""The platform at work: ``delivery run`` in this event loop while the demo publishes at a
steady pace and waits for every delivery; then it drains and stops."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from delivery.demo.progress import _Progress, say
from delivery.demo.scenario import (
    ACCOUNTS,
    BATCH_SIZE,
    PUBLISH_RATE_PER_S,
    READY_TIMEOUT_S,
    STALL_TIMEOUT_S,
    _Route,
)
from delivery.demo.summary import _RunTimes
from delivery.events import NewEvent
from delivery.ops.health import Health
from delivery.outbox import publish_many
from delivery.runner import process_runner
from delivery.settings import Settings
from delivery.testing.receiver import Receiver


async def _with_platform(
    *,
    settings: Settings,
    conn: asyncpg.Connection,
    batch: list[NewEvent],
    receiver: Receiver,
    expected: dict[_Route, set[str]],
    progress: _Progress,
) -> _RunTimes | str:
    """Run the platform process (``delivery run``, in this event loop) while publishing and
    waiting; then drain and stop it. A string says what went wrong."""
    run_process = process_runner()  # the embedding API of `delivery run`

    stop = asyncio.Event()
    health: list[Health] = []
    outcome: _RunTimes | str = "the platform process stopped before the end"
    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                run_process(
                    settings,
                    relay=True,
                    worker=True,
                    stop=stop,
                    ready=health.append,
                    handle_signals=False,
                ),
                name="delivery run",
            )
            try:
                not_ready = await _wait_ready(health)
                if not_ready is not None:
                    outcome = not_ready
                else:
                    say("relay + dispatch + delivery workers are running (`delivery run`)")
                    say(
                        f"publishing {len(batch):,} events for {len(ACCOUNTS)} accounts, "
                        f"{BATCH_SIZE} per transaction, about {PUBLISH_RATE_PER_S:,} a second:"
                    )
                    outcome = await _publish_and_wait(
                        conn=conn,
                        batch=batch,
                        receiver=receiver,
                        expected=expected,
                        progress=progress,
                        tg=tg,
                    )
            finally:
                stop.set()  # drain and stop the platform process
    except* Exception as group:
        first = group.exceptions[0]
        outcome = f"stopped by an error: {type(first).__name__}: {first}"
    return outcome


async def _wait_ready(health: list[Health]) -> str | None:
    """``None`` once the relay and workers are connected, else why not (after a deadline)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while not (health and health[0].ready):
        if time.monotonic() > deadline:
            report = health[0].report() if health else {"components": "not started"}
            return f"the platform did not become ready in {READY_TIMEOUT_S:.0f} s: {report}"
        await asyncio.sleep(0.05)
    return None


async def _publish_and_wait(
    *,
    conn: asyncpg.Connection,
    batch: list[NewEvent],
    receiver: Receiver,
    expected: dict[_Route, set[str]],
    progress: _Progress,
    tg: asyncio.TaskGroup,
) -> _RunTimes:
    drawn = asyncio.Event()
    drawer = tg.create_task(progress.run(drawn))
    commit_at: dict[str, float] = {}
    first_publish_at, started = time.time(), time.monotonic()
    transactions = 0
    for n, start in enumerate(range(0, len(batch), BATCH_SIZE)):
        # A steady producer: batch n leaves at n * BATCH_SIZE / rate seconds.
        due = started + n * BATCH_SIZE / PUBLISH_RATE_PER_S
        if (pause_s := due - time.monotonic()) > 0:
            await asyncio.sleep(pause_s)
        chunk = batch[start : start + BATCH_SIZE]
        async with conn.transaction():
            result = await publish_many(conn, chunk)
        committed = time.time()
        transactions += 1
        commit_at.update(dict.fromkeys(result.published, committed))
        progress.published += len(chunk)
    published_in_s = time.time() - first_publish_at

    wanted = {route.path: len(ids) for route, ids in expected.items()}

    def complete(r: Receiver) -> bool:
        return all(r.unique_count(path) >= n for path, n in wanted.items())

    stalled = False
    while True:
        before = receiver.delivered_count()
        try:
            await receiver.wait_for(complete, STALL_TIMEOUT_S, "every delivery")
            break
        except TimeoutError:
            if receiver.delivered_count() == before:  # nothing at all for the whole wait
                stalled = True
                break
    drawn.set()
    await drawer
    return _RunTimes(commit_at, first_publish_at, published_in_s, transactions, stalled)
