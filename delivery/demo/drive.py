"""The platform at work: ``delivery run`` and ``delivery api`` in this event loop while the
demo publishes at a steady pace, follows a few accounts' balances on the live stream and waits
for every delivery; then it checks the live balances against the API's snapshot, drains and
stops."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from decimal import Decimal

import aiohttp
import asyncpg

from delivery.api.server import serve_api
from delivery.demo.progress import _Progress, say
from delivery.demo.scenario import (
    ACCOUNTS,
    BATCH_SIZE,
    PUBLISH_RATE_PER_S,
    READY_TIMEOUT_S,
    STALL_TIMEOUT_S,
    STREAMED_ACCOUNTS,
    WATCHED_ACCOUNT,
    _Route,
)
from delivery.demo.summary import _BalanceCheck, _RunTimes
from delivery.errors import StreamRefusedError
from delivery.events import NewEvent
from delivery.ops.health import Health
from delivery.outbox import publish_many
from delivery.runner import process_runner
from delivery.settings import Settings
from delivery.store import keys
from delivery.store.tenants import DEFAULT_TENANT
from delivery.stream import BalanceStream
from delivery.testing.processes import free_port
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
    api_settings = settings.model_copy(update={"api_port": free_port()})
    api_url = f"http://{api_settings.api_host}:{api_settings.api_port}"

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
            tg.create_task(
                serve_api(api_settings, stop=stop, handle_signals=False), name="delivery api"
            )
            try:
                not_ready = await _wait_ready(health) or await _wait_api(api_url)
                if not_ready is not None:
                    outcome = not_ready
                else:
                    say("relay + dispatch + delivery workers are running (`delivery run`)")
                    _, key = await keys.create(conn, DEFAULT_TENANT, keys.parse_scopes("read"))
                    say(f"`delivery api` on {api_url}, and a key that may read")
                    say(
                        f"  follows {', '.join(STREAMED_ACCOUNTS)} on its live stream"
                        " (delivery.stream.BalanceStream)"
                    )
                    say(
                        f"publishing {len(batch):,} events for {len(ACCOUNTS)} accounts, "
                        f"{BATCH_SIZE} per transaction, about {PUBLISH_RATE_PER_S:,} a second:"
                    )
                    async with BalanceStream(api_url, key, STREAMED_ACCOUNTS) as stream:
                        progress.live = lambda: _live_balance(stream, WATCHED_ACCOUNT)
                        run = await _publish_and_wait(
                            conn=conn,
                            batch=batch,
                            receiver=receiver,
                            expected=expected,
                            progress=progress,
                            tg=tg,
                        )
                        checked = await _check_balances(stream, api_url, key, batch)
                    outcome = dataclasses.replace(run, balances=checked)
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


async def _wait_api(url: str) -> str | None:
    """``None`` once ``delivery api`` answers HTTP, else why not (after a deadline)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            try:
                async with http.get(f"{url}/v1/accounts/{WATCHED_ACCOUNT}/balances"):
                    return None  # any answer (401 without a key): it listens
            except aiohttp.ClientError:
                await asyncio.sleep(0.05)
    return f"`delivery api` did not answer on {url} in {READY_TIMEOUT_S:.0f} s"


def _live_balance(stream: BalanceStream, account: str) -> str:
    usd = stream.balances(account).get("USD")
    return f"{account} balance {'-' if usd is None else f'{usd:,.2f} USD'}"


def _money(balances: dict[str, Decimal]) -> str:
    return ", ".join(f"{v:,.2f} {asset}" for asset, v in sorted(balances.items())) or "none"


async def _check_balances(
    stream: BalanceStream, url: str, key: str, batch: list[NewEvent]
) -> _BalanceCheck:
    """Every followed account's balances as the stream rebuilt them must equal the API's
    snapshot (``GET /v1/accounts/{id}/balances``) and the last balance the demo published."""
    published: dict[str, dict[str, Decimal]] = {a: {} for a in STREAMED_ACCOUNTS}
    for event in batch:
        if event.type == "account.balance_changed" and event.account_id in published:
            published[event.account_id][event.data["asset"]] = Decimal(event.data["balance"])
    check = _BalanceCheck(lines=["live balances (rebuilt from the stream) = the API's snapshot:"])
    headers = {"Authorization": f"Bearer {key}"}
    async with aiohttp.ClientSession(base_url=url, headers=headers) as http:
        for account in STREAMED_ACCOUNTS:
            async with http.get(f"/v1/accounts/{account}/balances") as answer:
                answer.raise_for_status()
                snap = await answer.json()
            sequence = int(snap["sequence"])
            snapshot = {asset: Decimal(v) for asset, v in snap["balances"].items()}
            try:
                await stream.caught_up({account: sequence}, timeout_s=STALL_TIMEOUT_S)
            except (TimeoutError, StreamRefusedError) as exc:
                check.failures.append(
                    f"live balance of {account}: the stream did not reach sequence {sequence}"
                    f" ({type(exc).__name__}: {exc})"
                )
                continue
            live = stream.balances(account)
            if live == snapshot == published[account]:
                check.lines.append(f"  {account}  {_money(live)} at sequence {sequence}")
            else:
                check.failures.append(
                    f"live balance of {account} at sequence {sequence}: stream {_money(live)},"
                    f" snapshot {_money(snapshot)}, published {_money(published[account])}"
                )
    return check


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
