"""The load generator of ``bench.api_frameworks``: one process, an aiohttp client with N
keep-alive connections, each sending its next request as soon as the last one is answered
(closed loop), for a warm-up and then a measured window.

    python -m bench.api_load --url http://127.0.0.1:PORT --route post --server-pid PID

Prints one JSON object: requests answered in the window, requests/s, p50/p99 latency, the
server's CPU seconds over the window (from /proc, children included), this process's own CPU
seconds (a client near 1 s per second is the bottleneck, not the server) and how busy the whole
machine was meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.measure import cpu_s, machine_cpu_ticks, percentile

GET_IDS = 64  # distinct ids the GET route is asked for, round robin


def batch_body(events: int) -> bytes:
    """``{"events": [...]}`` of ``events`` trade.executed envelopes, as the contract spells them."""
    return orjson.dumps(
        {
            "events": [
                {
                    "id": f"evt_bench_{i:06d}",
                    "type": "trade.executed",
                    "account_id": f"acc_{i % 7}",
                    "occurred_at": "2026-12-07T21:00:00.123456Z",
                    "data": {
                        "trade_id": f"trd_{i:08d}",
                        "order_id": f"ord_{i:08d}",
                        "instrument": "BTC-USD",
                        "side": "buy" if i % 2 else "sell",
                        "quantity": "0.125",
                        "price": "43210.57",
                        "executed_at": "2026-12-07T21:00:00.120000Z",
                    },
                }
                for i in range(events)
            ]
        }
    )


@dataclass
class Window:
    measuring: bool = False
    stopped: bool = False
    latencies_s: list[float] = field(default_factory=list)
    errors: int = 0


async def _client(
    session: aiohttp.ClientSession, args: argparse.Namespace, body: bytes, window: Window, n: int
) -> None:
    headers = {"content-type": "application/json"}
    expected = 202 if args.route == "post" else 200
    i = n
    while not window.stopped:
        started = time.perf_counter()
        counted = window.measuring
        if args.route == "post":
            request = session.post(f"{args.url}/v1/events", data=body, headers=headers)
        else:
            request = session.get(f"{args.url}/v1/events/evt_bench_{i % GET_IDS:06d}")
            i += args.connections
        async with request as response:
            await response.read()
            ok = response.status == expected
        # Only requests that started and ended inside the window count.
        if counted and window.measuring:
            if ok:
                window.latencies_s.append(time.perf_counter() - started)
            else:
                window.errors += 1


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    body = batch_body(args.events)
    window = Window()
    connector = aiohttp.TCPConnector(limit=args.connections, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session, asyncio.TaskGroup() as tg:
        for n in range(args.connections):
            tg.create_task(_client(session, args, body, window, n))
        # The window is a fixed length of time, so waiting for it is the measurement itself.
        await asyncio.sleep(args.warmup_s)
        server_before, machine_before = cpu_s(args.server_pid), machine_cpu_ticks()
        own_before, started = time.process_time(), time.perf_counter()
        window.measuring = True
        await asyncio.sleep(args.duration_s)
        window.measuring = False
        elapsed_s = time.perf_counter() - started
        server_after, machine_after = cpu_s(args.server_pid), machine_cpu_ticks()
        own_s = time.process_time() - own_before
        window.stopped = True
    latencies = sorted(window.latencies_s)
    requests = len(latencies)
    busy = machine_after[0] - machine_before[0]
    total = machine_after[1] - machine_before[1]
    return {
        "requests": requests,
        "errors": window.errors,
        "elapsed_s": elapsed_s,
        "rps": requests / elapsed_s,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "server_cpu_s": server_after - server_before,
        "server_cpu_ms_per_request": (server_after - server_before) * 1000 / max(requests, 1),
        "client_cpu_s": own_s,
        "machine_busy": busy / total if total else 0.0,
        "body_bytes": len(body) if args.route == "post" else 0,
    }


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.api_load",
        description="Closed-loop HTTP load on one route of the benchmark service; prints JSON.",
    )
    add = p.add_argument
    add("--url", required=True, help="base URL of the service, e.g. http://127.0.0.1:8080")
    add("--route", choices=["post", "get"], required=True, help="which route to load")
    add("--server-pid", type=int, required=True, help="the server's process id, for its CPU")
    add("--connections", type=int, default=16, help="concurrent keep-alive connections")
    add("--events", type=int, default=20, help="envelopes per POST body")
    add("--warmup-s", type=float, default=1.0, help="seconds of load before the window opens")
    add("--duration-s", type=float, default=5.0, help="seconds of the measured window")
    return p


def main() -> None:
    result = uvloop.run(measure(parser().parse_args()))
    sys.stdout.buffer.write(orjson.dumps(result) + b"\n")


if __name__ == "__main__":
    main()
