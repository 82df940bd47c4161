"""The benchmark's subscriber: the project's one receiver,
``delivery.testing.receiver.Receiver`` (it answers as told and verifies every Standard Webhooks
signature with ``delivery.signing``), in a process of its own so that its CPU never counts as a
system's, with a control API beside it.

    python -m bench.receiver --secret whsec_... --paths /s0,/s1
    # prints "READY <webhooks port> <control port>" once listening

The control port serves ``/_bench/``: wait for a count, read the stats and the arrivals since
the last reset, reset, set a path's behaviour. ``ReceiverProcess`` starts it and is its client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import orjson
import uvloop
from aiohttp import web

from bench.processes import REPO, env, terminate
from delivery.testing.receiver import Behaviour, Receiver

CONTROL = "/_bench/"
# Connections a system may open at once (a deliverer's cap is 512) when a staged backlog is
# released; aiohttp listens with 128.
LISTEN_BACKLOG = 1024


class Arrived(NamedTuple):
    path: str
    webhook_id: str
    at: float  # time.time() when the request was read
    status: int | None  # what the receiver answered; None: never (a hang)


# -- the process ----------------------------------------------------------------------------


class Recorded:
    """The receiver's arrivals since the last reset, indexed as they are read (each once)."""

    def __init__(self, receiver: Receiver, verifying: bool) -> None:
        self._receiver = receiver
        self._verifying = verifying
        self.reset()

    def reset(self) -> None:
        self._start = self._read = len(self._receiver.arrivals)
        self._bad_signatures = 0
        self._last_at: float | None = None
        self._ok_ids: dict[str, set[str]] = {}

    def _catch_up(self) -> None:
        arrivals = self._receiver.arrivals
        for i in range(self._read, len(arrivals)):
            a = arrivals[i]
            if self._verifying and a.signature_ok is not True:
                self._bad_signatures += 1
            if a.delivered:
                self._ok_ids.setdefault(a.path, set()).add(a.webhook_id)
            if self._last_at is None or a.arrived_at > self._last_at:
                self._last_at = a.arrived_at
        self._read = len(arrivals)

    def count(self, unique_on: str | None = None) -> int:
        """Arrivals, or with ``unique_on`` the ids answered 2xx on that path."""
        if unique_on is None:
            return len(self._receiver.arrivals) - self._start
        self._catch_up()
        return len(self._ok_ids.get(unique_on, ()))

    def stats(self) -> dict[str, Any]:
        """Cheap enough to poll every second; duplicates are counted from ``arrivals``."""
        self._catch_up()
        arrivals = self._receiver.arrivals
        return {
            "count": self.count(),
            "bad_signatures": self._bad_signatures,
            "first_at": arrivals[self._start].arrived_at if self.count() else None,
            "last_at": self._last_at,
        }

    def arrivals(self) -> list[tuple[str, str, float, int | None]]:
        return [
            (a.path, a.webhook_id, a.arrived_at, a.status)
            for a in self._receiver.arrivals[self._start :]
        ]


def _control_app(receiver: Receiver, recorded: Recorded) -> web.Application:
    def answer(value: object) -> web.Response:
        return web.Response(body=orjson.dumps(value), content_type="application/json")

    async def wait(request: web.Request) -> web.Response:
        target = int(request.query["count"])
        timeout_s = float(request.query.get("timeout_s", "60"))
        unique_on = request.query.get("unique_on")
        with contextlib.suppress(TimeoutError):
            await receiver.wait_for(
                lambda _r: recorded.count(unique_on) >= target, timeout_s, f"{target} arrivals"
            )
        return answer({**recorded.stats(), "reached": recorded.count(unique_on)})

    async def stats(_request: web.Request) -> web.Response:
        return answer(recorded.stats())

    async def arrivals(_request: web.Request) -> web.Response:
        return answer(recorded.arrivals())

    async def reset(_request: web.Request) -> web.Response:
        recorded.reset()
        return web.Response(text="ok")

    async def behaviour(request: web.Request) -> web.Response:
        fields = orjson.loads(await request.read())
        receiver.set_behaviour(fields.pop("path"), Behaviour(**fields))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get(CONTROL + "wait", wait)
    app.router.add_get(CONTROL + "stats", stats)
    app.router.add_get(CONTROL + "arrivals", arrivals)
    app.router.add_post(CONTROL + "reset", reset)
    app.router.add_post(CONTROL + "behaviour", behaviour)
    return app


def _widen_backlog(port: int, backlog: int) -> None:
    """``listen()`` again, with a longer queue, on the socket listening on ``port`` (Linux
    takes a second ``listen`` on a listening socket as a new backlog)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = os.dup(int(name))
        except OSError:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            continue
        with sock:  # closes the duplicate only
            if (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
                and sock.getsockname()[1] == port
            ):
                sock.listen(backlog)


async def serve(secret: str | None, paths: list[str], control_port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Receiver() as receiver:
        _widen_backlog(receiver.port, LISTEN_BACKLOG)
        if secret:
            for path in paths:
                receiver.expect_secret(path, secret)
        runner = web.AppRunner(
            _control_app(receiver, Recorded(receiver, verifying=bool(secret))),
            access_log=None,
            handle_signals=False,
        )
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", control_port).start()
        print(f"READY {receiver.port} {runner.addresses[0][1]}", flush=True)
        try:
            await stop.wait()
        finally:
            await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.receiver")
    parser.add_argument("--control-port", type=int, default=0, help="0: a free one")
    parser.add_argument("--secret", default=None, help="whsec_... to verify every signature")
    parser.add_argument(
        "--paths",
        default="",
        help="comma-separated paths the secret is for; an arrival on any other path counts as "
        "a bad signature",
    )
    args = parser.parse_args()
    uvloop.run(serve(args.secret, [p for p in args.paths.split(",") if p], args.control_port))


# -- the client -----------------------------------------------------------------------------


class ReceiverProcess:
    """``python -m bench.receiver`` in its own process, and a client for its control API."""

    def __init__(self, secret: str, log_dir: Path) -> None:
        self.secret = secret
        self._log_dir = log_dir
        self._proc: asyncio.subprocess.Process | None = None
        self.port = 0
        self._control_port = 0
        self._http: aiohttp.ClientSession | None = None

    async def start(self, paths: list[str]) -> None:
        with open(self._log_dir / "receiver.log", "ab") as log:  # noqa: ASYNC230
            self._proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.receiver",
                "--secret",
                self.secret,
                "--paths",
                ",".join(paths),
                cwd=REPO,
                env=env(),
                stdout=asyncio.subprocess.PIPE,
                stderr=log,
                start_new_session=True,
            )
        assert self._proc.stdout is not None
        line = await asyncio.wait_for(self._proc.stdout.readline(), 30)
        if not line.startswith(b"READY "):
            raise RuntimeError(f"bench receiver did not start: {line!r}")
        self.port, self._control_port = (int(x) for x in line.split()[1:3])
        self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None))

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def _control(self, what: str) -> str:
        return f"http://127.0.0.1:{self._control_port}{CONTROL}{what}"

    async def _get(self, what: str, **query: object) -> Any:
        assert self._http is not None
        async with self._http.get(self._control(what), params=query) as r:
            r.raise_for_status()
            return orjson.loads(await r.read())

    async def _post(self, what: str, body: bytes = b"") -> None:
        assert self._http is not None
        async with self._http.post(self._control(what), data=body) as r:
            r.raise_for_status()

    async def stats(self) -> dict[str, Any]:
        return dict(await self._get("stats"))

    async def wait(
        self, count: int, timeout_s: float, what: str, *, unique_on: str | None = None
    ) -> dict[str, Any]:
        """Wait for ``count`` arrivals since the last reset (with ``unique_on``: for ``count``
        ids answered 2xx on that path); the stats then. ``TimeoutError`` after ``timeout_s``."""
        query: dict[str, object] = {"count": count, "timeout_s": timeout_s}
        if unique_on is not None:
            query["unique_on"] = unique_on
        stats = await self._get("wait", **query)
        if stats["reached"] < count:
            raise TimeoutError(f"{what}: {stats['reached']} of {count} arrived in {timeout_s:g}s")
        return dict(stats)

    async def arrivals(self) -> list[Arrived]:
        return [Arrived(*a) for a in await self._get("arrivals")]

    async def reset(self) -> None:
        await self._post("reset")

    async def set_behaviour(self, path: str, behaviour: Behaviour) -> None:
        await self._post("behaviour", orjson.dumps({"path": path, **dataclasses.asdict(behaviour)}))

    async def stop(self) -> None:
        if self._http is not None:
            await self._http.close()
        if self._proc is not None:
            await terminate([self._proc])


if __name__ == "__main__":
    main()
