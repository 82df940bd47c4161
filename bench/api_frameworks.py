"""Which HTTP framework costs least per request: the same tiny service (``bench/api_service.py``)
on aiohttp, Starlette, FastAPI and Litestar (and Litestar's msgspec path), one at a time, under
the same load (``bench.api_load``); writes ``bench/API_FRAMEWORKS.md``.

    python -m bench.api_frameworks            # 3 runs of each, about 4 minutes
    python -m bench.api_frameworks --quick    # 1 short run of each, under a minute (a smoke)
    python -m bench.api_frameworks --merge    # another invocation beside the ones kept
    python -m bench.api_frameworks --render   # API_FRAMEWORKS.md again (after editing the notes)

The frameworks are not dependencies of the project: the first run makes a venv of its own
(``--venv``, default ``bench/out/api-venv``) and installs them there with pip, with aiohttp,
pydantic, uvloop and orjson pinned to the versions of the venv running this command. Every
server runs from that venv, the load generator from this one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop

from bench.api_load import batch_body
from bench.facts import code_under_test
from bench.measure import loadavg, machine_facts, summarize
from bench.processes import REPO, env, spawn, terminate
from bench.sessions import say

HERE = Path(__file__).resolve().parent
SERVICE = HERE / "api_service.py"
RESULTS_JSON = HERE / "api_frameworks.json"
RESULTS_MD = HERE / "API_FRAMEWORKS.md"
# Written by hand from the figures; rendered after them (as bench/notes.md is for RESULTS.md).
NOTES_MD = HERE / "api_frameworks_notes.md"
OUT = HERE / "out" / "api_frameworks"
FRAMEWORKS = ["aiohttp", "starlette", "fastapi", "litestar", "litestar-msgspec"]
LABELS = {
    "aiohttp": "aiohttp (web.Application, own server)",
    "starlette": "Starlette on uvicorn",
    "fastapi": "FastAPI on uvicorn",
    "litestar": "Litestar on uvicorn (pydantic models)",
    "litestar-msgspec": "Litestar on uvicorn, msgspec models (its native path)",
}
# The same version on both sides, so aiohttp's figures are the ones the project would run.
PINNED = ["aiohttp", "pydantic", "pydantic-core", "uvloop", "orjson"]
UNPINNED = ["uvicorn", "httptools", "starlette", "fastapi", "litestar", "msgspec"]
READY_TIMEOUT_S = 30.0


def requirements() -> list[str]:
    return [f"{n}=={importlib.metadata.version(n)}" for n in PINNED] + UNPINNED


def ensure_venv(venv: Path) -> Path:
    """The venv's python, made and filled the first time (again when the requirements change)."""
    python = venv / "bin" / "python"
    stamp = venv / "bench-requirements.txt"
    wanted = "\n".join(requirements()) + "\n"
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    say(f"installing the frameworks into {venv} (once)")
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", *requirements()],
        check=True,
        timeout=600,
    )
    stamp.write_text(wanted)
    return python


def venv_versions(python: Path) -> dict[str, str]:
    names = sorted({*PINNED, *UNPINNED})
    code = (
        "import importlib.metadata as m, json, sys; "
        "print(json.dumps({n: m.version(n) for n in sys.argv[1:]}))"
    )
    out = subprocess.run(
        [str(python), "-c", code, *names], capture_output=True, text=True, check=True, timeout=60
    )
    versions: dict[str, str] = json.loads(out.stdout)
    return versions


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _wait_ready(url: str, server: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if server.returncode is not None:
                raise RuntimeError(f"server exited {server.returncode}; see {log}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{url}/v1/events/ready") as r:
                    if r.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise RuntimeError(f"server not answering after {READY_TIMEOUT_S:g} s; see {log}")


async def check_answers(url: str, events: int) -> None:
    """Every variant must answer the same thing (else the comparison is of different work): the
    POST's ids in order, the GET's object, and a refusal of a float where a decimal string goes."""
    body = batch_body(events)
    expected_ids = [e["id"] for e in orjson.loads(body)["events"]]
    bad = body.replace(b'"quantity":"0.125"', b'"quantity":0.125', 1)
    async with aiohttp.ClientSession(headers={"content-type": "application/json"}) as session:
        async with session.post(f"{url}/v1/events", data=body) as r:
            answer = await r.json(content_type=None)
            if r.status != 202 or answer != {
                "published": events,
                "duplicates": 0,
                "ids": expected_ids,
            }:
                raise RuntimeError(f"POST answered {r.status} {answer!r}")
        async with session.get(f"{url}/v1/events/evt_x") as r:
            shown = await r.json(content_type=None)
            if r.status != 200 or shown.get("id") != "evt_x" or shown.get("sequence") != 7:
                raise RuntimeError(f"GET answered {r.status} {shown!r}")
        async with session.post(f"{url}/v1/events", data=bad) as r:
            if r.status not in (400, 422):
                raise RuntimeError(f"a float quantity was answered {r.status}, not refused")


@contextlib.asynccontextmanager
async def serving(python: Path, framework: str) -> AsyncIterator[tuple[str, int]]:
    """One framework's server, answering, for the duration of the block: (base URL, pid)."""
    port = free_port()
    OUT.mkdir(parents=True, exist_ok=True)
    log = OUT / f"{framework}.log"
    server = await spawn(
        [str(python), str(SERVICE), framework, "--port", str(port)],
        env({"PYTHONUNBUFFERED": "1"}),
        log,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        await _wait_ready(url, server, log)
        yield url, server.pid
    finally:
        await terminate([server])


async def load(url: str, pid: int, route: str, args: argparse.Namespace) -> dict[str, Any]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.api_load",
        f"--url={url}",
        f"--route={route}",
        f"--server-pid={pid}",
        f"--connections={args.connections}",
        f"--events={args.events}",
        f"--warmup-s={args.warmup_s}",
        f"--duration-s={args.duration_s}",
        cwd=REPO,
        env=env(),
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator exited {proc.returncode} on {route} {url}")
    result: dict[str, Any] = json.loads(out)
    return result


async def measure_all(python: Path, args: argparse.Namespace) -> dict[str, Any]:
    sessions: dict[str, dict[str, list[dict[str, Any]]]] = {
        f: {"post": [], "get": []} for f in args.frameworks
    }
    for run in range(args.runs):
        # Each run starts with another framework, so none always goes first on a busy machine.
        shift = run % len(args.frameworks)
        for framework in args.frameworks[shift:] + args.frameworks[:shift]:
            async with serving(python, framework) as (url, pid):
                await check_answers(url, args.events)
                for route in ("post", "get"):
                    result = await load(url, pid, route, args)
                    result["loadavg_1m"] = loadavg()[0]
                    sessions[framework][route].append(result)
                    say(
                        f"run {run + 1}/{args.runs} {framework:<17} {route:<4} "
                        f"{result['rps']:>7,.0f} req/s  p50 {result['p50_ms']:.1f} ms  "
                        f"p99 {result['p99_ms']:.1f} ms  "
                        f"server {result['server_cpu_ms_per_request']:.3f} CPU ms/req  "
                        f"machine {result['machine_busy']:.0%} busy  errors {result['errors']}"
                    )
    return sessions


def _cell(values: list[float], digits: int) -> str:
    return summarize(values).fmt(digits)


def table(invocation: dict[str, Any]) -> str:
    rows = [
        "| framework | route | runs | requests/s | p50 ms | p99 ms | server CPU ms/request "
        "| client CPU share | machine busy | errors |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for framework, routes in invocation["sessions"].items():
        for route, runs in routes.items():
            if not runs:
                continue
            client = [r["client_cpu_s"] / r["elapsed_s"] for r in runs]
            rows.append(
                f"| {LABELS[framework]} | {'POST 20 events' if route == 'post' else 'GET one'} "
                f"| {len(runs)} | {_cell([r['rps'] for r in runs], 0)} "
                f"| {_cell([r['p50_ms'] for r in runs], 1)} "
                f"| {_cell([r['p99_ms'] for r in runs], 1)} "
                f"| {_cell([r['server_cpu_ms_per_request'] for r in runs], 3)} "
                f"| {_cell(client, 2)} | {_cell([r['machine_busy'] * 100 for r in runs], 0)} % "
                f"| {sum(r['errors'] for r in runs)} |"
            )
    return "\n".join(rows)


def render(results: dict[str, Any]) -> str:
    parts = [
        "# HTTP frameworks: cost per request of the same tiny service",
        "",
        "Generated by `python -m bench.api_frameworks` (see its `--help`, and the method in "
        "`bench/api_frameworks.py` and `bench/api_service.py`). Medians of the runs, "
        "(min\u2013max) in brackets. Server CPU is the server process's user + system time over "
        "the measured window (from /proc) divided by the requests answered in it. Client CPU "
        "share: the load generator's CPU seconds per second (near 1.00 it, not the server, set "
        "the rate). Machine busy: the share of all CPUs busy during the window, ours and everyone "
        "else's (this machine is shared).",
    ]
    for inv in results["invocations"]:
        versions = ", ".join(f"{k} {v}" for k, v in inv["versions"].items())
        parts += [
            "",
            f"## {inv['started']} \u2013 {inv['finished']}",
            "",
            f"`{inv['command']}`; {inv['params']['connections']} connections, "
            f"{inv['params']['warmup_s']:g} s warm-up + {inv['params']['duration_s']:g} s "
            f"measured per route and run; machine: {inv['machine']['nproc']} CPUs "
            f"({inv['machine']['cpu_model']}), load average at start "
            f"{', '.join(f'{x:.2f}' for x in inv['load_at_start'])}, at end "
            f"{', '.join(f'{x:.2f}' for x in inv['load_at_end'])}; "
            f"code: `{inv['code']['commit']}`.",
            f"Versions: {versions}.",
            "",
            table(inv),
        ]
    if NOTES_MD.exists():
        parts += ["", NOTES_MD.read_text().rstrip()]
    return "\n".join(parts) + "\n"


def _positive(cast: type[int] | type[float]) -> Any:
    def check(text: str) -> int | float:
        value = cast(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return check


def _frameworks(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in FRAMEWORKS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown framework {', '.join(unknown) or '(none)'}")
    return names


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench.api_frameworks",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Cost per request of the same tiny service on each HTTP framework, "
        "one at a time. Writes bench/api_frameworks.json and bench/API_FRAMEWORKS.md.",
    )
    add = p.add_argument
    add(
        "--runs", type=_positive(int), default=3, help="sessions per framework (the median is kept)"
    )
    add("--duration-s", type=_positive(float), default=5.0, help="measured seconds per route")
    add("--warmup-s", type=_positive(float), default=1.0, help="seconds of load before each window")
    add("--connections", type=_positive(int), default=16, help="concurrent keep-alive connections")
    add("--events", type=_positive(int), default=20, help="envelopes in each POST body")
    add(
        "--frameworks",
        type=_frameworks,
        default=FRAMEWORKS,
        help=f"comma-separated frameworks to measure, of {','.join(FRAMEWORKS)}",
    )
    add(
        "--venv",
        type=Path,
        default=OUT.parent / "api-venv",
        help="the venv the frameworks are installed into (made the first time)",
    )
    add(
        "--merge",
        action="store_true",
        help="keep earlier invocations in bench/api_frameworks.json (runs side by side)",
    )
    add(
        "--render",
        action="store_true",
        help="measure nothing: write bench/API_FRAMEWORKS.md again from bench/api_frameworks.json",
    )
    add(
        "--quick",
        action="store_true",
        help="a smoke: 1 run, 0.5 s warm-up, 1.5 s measured; prints the table, writes no file",
    )
    return p


def main() -> None:
    args = parser().parse_args()
    if args.render:
        RESULTS_MD.write_text(render(json.loads(RESULTS_JSON.read_text())))
        say(f"wrote {RESULTS_MD}")
        return
    if args.quick:
        args.runs, args.warmup_s, args.duration_s = 1, 0.5, 1.5
    python = ensure_venv(args.venv)
    invocation: dict[str, Any] = {
        "command": " ".join(["python -m bench.api_frameworks", *sys.argv[1:]]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": machine_facts(),
        "versions": venv_versions(python),
        "load_at_start": loadavg(),
        "code": code_under_test(),
        "params": {k: v for k, v in vars(args).items() if k not in ("venv",)},
    }
    invocation["sessions"] = uvloop.run(measure_all(python, args))
    invocation["load_at_end"] = loadavg()
    invocation["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    print(table(invocation))
    if args.quick:
        return
    results: dict[str, Any] = (
        json.loads(RESULTS_JSON.read_text())
        if args.merge and RESULTS_JSON.exists()
        else {"invocations": []}
    )
    results["invocations"].append(invocation)
    RESULTS_JSON.write_text(json.dumps(results, indent=1) + "\n")
    RESULTS_MD.write_text(render(results))
    say(f"wrote {RESULTS_MD}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
