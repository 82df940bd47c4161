"""Many live-stream clients on one ``delivery api`` process (issue #15): ``--clients`` WebSocket
clients of ``GET /v1/stream`` while a producer commits ``--rate`` events/s for ``--seconds``.

Measured, per session (a fresh database and API process each, ``--runs`` of them):

* commit -> frame latency, p50 / p90 / p99 / max: from the moment the producer's publish
  returned (its commit; a little after the commit itself, so the figure errs low by that
  return trip) to the moment a client read the frame, on the same machine's clock;
* memory per client: the API process's RSS after every client has subscribed, minus its RSS
  before the first one connected (after a warm-up client came and went), over the clients;
* CPU per frame: the API process's CPU seconds (utime + stime) from the first publish to the
  last frame read, over the frames the clients read;
* that each client got exactly the events of its accounts, each once (``missing``,
  ``duplicates``, ``unexpected`` must be 0).

Subscription shapes (``--shape``): ``one``: client i subscribes to one account,
``acc_{i % accounts}`` (with 1,000 clients and 1,000 accounts: each event goes to one client,
every client gets rate / 1,000 events/s); ``all``: every client subscribes to every account of
the tenant (each event goes to every client: frames/s = rate x clients).

The clients run in ``--client-processes`` separate processes (aiohttp's WebSocket client), so
the API process's CPU is measured alone; the producer (``--producers`` connections sharing the
schedule, one event per transaction) runs in this process. Check ``achieved_rate``: when commits
are slow (a loaded machine) the producers fall short of ``--rate``.

    python -m bench.stream_clients                              # 1,000 clients, 500 ev/s, 3 runs
    python -m bench.stream_clients --clients 20 --rate 50 --seconds 2 --runs 1   # a smoke

Services: DELIVERY_DATABASE_URL / DELIVERY_AMQP_URL when set (a database of its own per
session, dropped afterwards), otherwise throwaway local servers. Prints one JSON object;
``--out FILE`` also writes it there.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import secrets
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson

from bench.facts import code_under_test
from bench.measure import cpu_s, loadavg, peak_rss_bytes, percentile, rss_bytes
from bench.ours import PACED_PRODUCERS
from bench.sessions import MB, say
from delivery.outbox import publish_many
from delivery.store import keys, tenants
from delivery.store.migrations import migrate
from delivery.testing.api import ApiProcess, api_process
from delivery.testing.services import create_database, drop_database, provision_services

SHAPES = ("one", "all")
_CONNECT_CONCURRENCY = 50
_CONNECT_TIMEOUT_S = 120.0
_DRAIN_TIMEOUT_S = 60.0


def account(i: int) -> str:
    return f"acc_{i:05d}"


def event(run: str, i: int, accounts: int) -> dict[str, Any]:
    """A ~300-byte balance event of account ``i % accounts``."""
    return {
        "id": f"evt_{run}_{i:08d}",
        "type": "account.balance_changed",
        "account_id": account(i % accounts),
        "data": {
            "asset": "USDT",
            "delta": "-801.54312500",
            "balance": f"{120394 + i}.11250000",
            "reason": "trade",
        },
    }


def subscribe_message(client: int, shape: str, accounts: int) -> str:
    if shape == "all":
        return json.dumps({"op": "subscribe"})
    return json.dumps({"op": "subscribe", "accounts": [account(client % accounts)]})


# -- the clients' process ---------------------------------------------------------------------


async def _clients_main(args: argparse.Namespace) -> None:
    """``--first`` .. ``--first + --count - 1``: connect, subscribe, record every event frame's
    id and receive time. Commands on stdin, one a line: ``count`` (answers the frames read so
    far), ``stop`` (closes, answers every record as one JSON line, exits)."""
    received: list[tuple[int, str, float]] = []  # (client, event id, time read)
    subscribed = 0
    gate = asyncio.Semaphore(_CONNECT_CONCURRENCY)
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {args.key}"}

    async def client(number: int) -> None:
        nonlocal subscribed
        async with gate:
            ws = await http.ws_connect("/v1/stream", heartbeat=None, autoping=True)
            await ws.send_str(subscribe_message(number, args.shape, args.accounts))
            subscribed += 1
        async with ws, asyncio.TaskGroup() as tasks:
            reading = tasks.create_task(_read(ws, number))
            await stop.wait()
            reading.cancel()

    async def _read(ws: aiohttp.ClientWebSocketResponse, number: int) -> None:
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                break
            at = time.time()
            frame = orjson.loads(msg.data)
            if "id" in frame:
                received.append((number, frame["id"], at))

    async def commands() -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "count":
                print(json.dumps({"subscribed": subscribed, "frames": len(received)}), flush=True)
            elif line == "stop":
                break
        stop.set()

    async with (
        aiohttp.ClientSession(args.url, headers=headers, connector=connector) as http,
        asyncio.TaskGroup() as tg,
    ):
        tg.create_task(commands())
        for number in range(args.first, args.first + args.count):
            tg.create_task(client(number))
    print(json.dumps({"received": received}), flush=True)


class ClientsProcess:
    """One process of clients, driven through its stdin."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, api: ApiProcess, key: str, first: int, count: int, args: argparse.Namespace
    ) -> ClientsProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.stream_clients",
            "--clients-process",
            "--url",
            api.url,
            "--key",
            key,
            "--first",
            str(first),
            "--count",
            str(count),
            "--shape",
            args.shape,
            "--accounts",
            str(args.accounts),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            limit=2**30,
        )
        return cls(proc)

    async def _ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        line = await self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"a clients process exited ({self.proc.returncode})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def count(self) -> dict[str, Any]:
        return await self._ask("count")

    async def stop(self) -> list[tuple[int, str, float]]:
        answer = await self._ask("stop")
        await self.proc.wait()
        return [(int(c), str(i), float(t)) for c, i, t in answer["received"]]

    def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()


async def _wait_all(
    groups: list[ClientsProcess], key: str, target: int, timeout_s: float, what: str
) -> int:
    """Until the clients' ``key`` (subscribed, frames) adds up to ``target``; the sum then."""
    deadline = time.monotonic() + timeout_s
    while True:
        total = sum([int((await g.count())[key]) for g in groups])
        if total >= target:
            return total
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {total} of {target} after {timeout_s:g} s")
        await asyncio.sleep(0.05)


async def _stream_gauge(api: ApiProcess) -> float:
    async with aiohttp.ClientSession() as http, http.get(api.admin_url + "/metrics") as answer:
        for line in (await answer.text()).splitlines():
            if line.startswith("delivery_stream_clients "):
                return float(line.split()[1])
    return 0.0


async def _wait_gauge(api: ApiProcess, target: int, timeout_s: float) -> None:
    """Until the API has registered ``target`` stream clients (subscribe read, admitted)."""
    deadline = time.monotonic() + timeout_s
    while (seen := await _stream_gauge(api)) != target:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the API registered {seen:g} of {target} stream clients")
        await asyncio.sleep(0.05)


async def _produce(
    db_url: str, tenant: str, run: str, args: argparse.Namespace
) -> dict[str, float]:
    """``--rate`` events/s for ``--seconds``, one per transaction, from ``--producers``
    connections sharing the schedule (event i is due at i / rate); the time each publish
    returned."""
    n = int(args.rate * args.seconds)
    producers = args.producers
    conns = [await asyncpg.connect(db_url) for _ in range(producers)]
    committed: dict[str, float] = {}
    started = time.time() + 0.05

    async def producer(k: int) -> None:
        for i in range(k, n, producers):
            delay = started + i / args.rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            raw = event(run, i, args.accounts)
            await publish_many(conns[k], [raw], tenant=tenant)
            committed[raw["id"]] = time.time()

    try:
        async with asyncio.TaskGroup() as tg:
            for k in range(producers):
                tg.create_task(producer(k))
    finally:
        for c in conns:
            await c.close()
    return committed


async def _warm_up(api: ApiProcess, key: str, db_url: str, tenant: str) -> None:
    """One client subscribes, gets one event and leaves: the stream's code paths are loaded
    before the memory baseline is read."""
    async with api.client(key) as http, http.ws_connect("/v1/stream") as ws:
        await ws.send_str(json.dumps({"op": "subscribe", "accounts": ["acc_warm"]}))
        await _wait_gauge(api, 1, 30)
        conn = await asyncpg.connect(db_url)
        try:
            await publish_many(
                conn, [{**event("warm", 0, 1), "account_id": "acc_warm"}], tenant=tenant
            )
        finally:
            await conn.close()
        async with asyncio.timeout(30):
            msg = await ws.receive()
        if msg.type != aiohttp.WSMsgType.TEXT or "evt_warm" not in msg.data:
            raise RuntimeError(f"warm-up: expected the event, got {msg!r}")
    await _wait_gauge(api, 0, 30)


def _expected(committed: dict[str, float], args: argparse.Namespace) -> dict[int, set[str]]:
    """Per client, the ids it must get (event i is account ``i % accounts``'s)."""
    if args.shape == "all":
        return {c: set(committed) for c in range(args.clients)}
    by_account: dict[int, set[str]] = {}
    for event_id in committed:
        by_account.setdefault(int(event_id.rsplit("_", 1)[1]) % args.accounts, set()).add(event_id)
    return {c: by_account.get(c % args.accounts, set()) for c in range(args.clients)}


async def _measure(
    api: ApiProcess, key: str, db_url: str, tenant: str, args: argparse.Namespace
) -> dict[str, Any]:
    """Connect the clients, produce, wait for the frames: the raw readings."""
    pid = api.proc.pid
    groups: list[ClientsProcess] = []
    try:
        await _warm_up(api, key, db_url, tenant)
        rss_before = rss_bytes(pid)
        connect_started = time.monotonic()
        per = -(-args.clients // args.client_processes)
        for first in range(0, args.clients, per):
            count = min(per, args.clients - first)
            groups.append(await ClientsProcess.start(api, key, first, count, args))
        await _wait_all(groups, "subscribed", args.clients, _CONNECT_TIMEOUT_S, "connect")
        await _wait_gauge(api, args.clients, _CONNECT_TIMEOUT_S)
        readings: dict[str, Any] = {
            "connect_s": time.monotonic() - connect_started,
            "rss_before": rss_before,
            "rss_connected": rss_bytes(pid),
            "load": loadavg(),
        }
        cpu_before = cpu_s(pid)
        committed = await _produce(db_url, tenant, secrets.token_hex(3), args)
        expected = _expected(committed, args)
        frames_expected = sum(len(v) for v in expected.values())
        with contextlib.suppress(TimeoutError):  # what is missing is counted, below
            await _wait_all(groups, "frames", frames_expected, _DRAIN_TIMEOUT_S, "frames")
        readings |= {
            "cpu_s": cpu_s(pid) - cpu_before,
            "rss_after": rss_bytes(pid),
            "rss_peak": peak_rss_bytes(pid),
            "still_connected": await _stream_gauge(api),
            "committed": committed,
            "expected": expected,
            "received": [r for g in groups for r in await g.stop()],
        }
        return readings
    finally:
        for g in groups:
            g.kill()


def _figures(readings: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    committed: dict[str, float] = readings["committed"]
    expected: dict[int, set[str]] = readings["expected"]
    received: list[tuple[int, str, float]] = readings["received"]
    got: dict[int, list[str]] = {}
    latencies: list[float] = []
    for client, event_id, at in received:
        got.setdefault(client, []).append(event_id)
        if event_id in committed:
            latencies.append((at - committed[event_id]) * 1000)
    latencies.sort()
    missing = duplicates = unexpected = 0
    for c, want in expected.items():
        ids = got.get(c, [])
        duplicates += len(ids) - len(set(ids))
        missing += len(want - set(ids))
        unexpected += len(set(ids) - want)
    span = max(committed.values()) - min(committed.values())
    frames = len(received)
    cpu_used: float = readings["cpu_s"]
    return {
        "clients": args.clients,
        "shape": args.shape,
        "accounts": args.accounts,
        "events": len(committed),
        "achieved_rate": round((len(committed) - 1) / span, 1) if span > 0 else None,
        "frames": frames,
        "frames_expected": sum(len(v) for v in expected.values()),
        "missing": missing,
        "duplicates": duplicates,
        "unexpected": unexpected,
        "still_connected": int(readings["still_connected"]),
        "p50_ms": round(percentile(latencies, 0.50), 2),
        "p90_ms": round(percentile(latencies, 0.90), 2),
        "p99_ms": round(percentile(latencies, 0.99), 2),
        "max_ms": round(latencies[-1], 2) if latencies else None,
        "connect_s": round(readings["connect_s"], 2),
        "rss_before_mb": round(readings["rss_before"] / MB, 1),
        "rss_connected_mb": round(readings["rss_connected"] / MB, 1),
        "rss_after_mb": round(readings["rss_after"] / MB, 1),
        "rss_peak_mb": round(readings["rss_peak"] / MB, 1),
        "kb_per_client": round(
            (readings["rss_connected"] - readings["rss_before"]) / 1024 / args.clients, 1
        ),
        "api_cpu_s": round(cpu_used, 3),
        "api_cpu_ms_per_frame": round(cpu_used * 1000 / frames, 4) if frames else None,
        "load_at_start": readings["load"],
    }


async def session(db_admin: str, amqp: str, args: argparse.Namespace) -> dict[str, Any]:
    """One measurement on a fresh database and ``delivery api`` process."""
    db_name = f"bench_stream_{secrets.token_hex(3)}"
    db_url = await create_database(db_admin, db_name)
    try:
        await migrate(db_url)
        conn = await asyncpg.connect(db_url)
        try:
            tenant = (await tenants.add(conn, "bench")).id
            _, key = await keys.create(conn, tenant)
        finally:
            await conn.close()
        env = {
            **os.environ,
            "DELIVERY_DATABASE_URL": db_url,
            "DELIVERY_AMQP_URL": amqp,
            "DELIVERY_LOG_LEVEL": "warning",
            "DELIVERY_STREAM_MAX_CLIENTS_PER_TENANT": str(args.clients + 1),
        }
        async with api_process(env) as api:
            readings = await _measure(api, key, db_url, tenant, args)
    finally:
        await drop_database(db_admin, db_name)
    return _figures(readings, args)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    load_at_start = loadavg()
    runs = []
    with provision_services(progress=say) as services:
        for i in range(args.runs):
            result = await session(services.database_url, services.amqp_url, args)
            runs.append(result)
            say(
                f"run {i + 1}/{args.runs}: p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms, "
                f"{result['kb_per_client']} KB/client, {result['api_cpu_ms_per_frame']} ms "
                f"CPU/frame, missing {result['missing']}"
            )
    keys_ = ("p50_ms", "p90_ms", "p99_ms", "kb_per_client", "api_cpu_ms_per_frame", "achieved_rate")
    return {
        "code": code_under_test(),
        "load_at_start": load_at_start,
        "load_at_end": loadavg(),
        "median": {k: statistics.median(r[k] for r in runs) for k in keys_},
        "runs": runs,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.stream_clients",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--clients", type=int, default=1_000)
    p.add_argument("--accounts", type=int, default=1_000)
    p.add_argument("--shape", choices=SHAPES, default="one")
    p.add_argument("--rate", type=float, default=500.0, help="events/s the producer commits")
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument(
        "--producers",
        type=int,
        default=PACED_PRODUCERS,
        help="connections committing the events (one per transaction); on a loaded machine a "
        "commit's latency caps each at 1 / latency events/s",
    )
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--client-processes", type=int, default=4)
    p.add_argument("--out", type=Path)
    # A clients process (started by the bench itself).
    p.add_argument("--clients-process", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--url", help=argparse.SUPPRESS)
    p.add_argument("--key", help=argparse.SUPPRESS)
    p.add_argument("--first", type=int, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, help=argparse.SUPPRESS)
    return p


def main() -> None:
    args = parser().parse_args()
    if args.clients_process:
        asyncio.run(_clients_main(args))
        return
    out = asyncio.run(main_async(args))
    text = json.dumps(out, indent=2)
    if args.out is not None:
        args.out.write_text(text + "\n")
    print(text, file=sys.stdout)


if __name__ == "__main__":
    main()
