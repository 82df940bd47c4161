"""The benchmark's subscriber: a separate process that answers 200 to every POST, records when
each one arrived, and verifies its Standard Webhooks signature.

    python -m bench.receiver --secret whsec_...   # prints "READY <port>" once listening

It runs apart from the systems under test so that its CPU never counts as theirs. Control
endpoints under ``/_bench/`` let the orchestrator wait for a count, read the arrivals and reset.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import sys
import time

import orjson
import uvloop
from aiohttp import web

from delivery.signing import DEFAULT_TOLERANCE_S, secret_key

CONTROL = "/_bench/"


class Recorder:
    def __init__(self, secret: str | None) -> None:
        self._key = secret_key(secret) if secret else None
        self.arrivals: list[tuple[str, str, float]] = []  # (path, webhook-id, arrived_at)
        self.bad_signatures = 0
        self.last_at: float | None = None
        self._waiters: list[tuple[int, asyncio.Future[None]]] = []

    def signature_ok(self, headers: object, body: bytes) -> bool:
        assert self._key is not None
        get = headers.get  # type: ignore[attr-defined]
        msg_id, timestamp, header = (
            get("webhook-id"),
            get("webhook-timestamp"),
            get("webhook-signature"),
        )
        if not (msg_id and timestamp and header):
            return False
        try:
            if abs(time.time() - int(timestamp)) > DEFAULT_TOLERANCE_S:
                return False
        except ValueError:
            return False
        mac = hmac.new(self._key, f"{msg_id}.{timestamp}.".encode(), hashlib.sha256)
        mac.update(body)
        expected = base64.b64encode(mac.digest()).decode()
        return any(
            c.startswith("v1,") and hmac.compare_digest(c[3:], expected) for c in header.split(" ")
        )

    async def hook(self, request: web.Request) -> web.Response:
        body = await request.read()
        arrived_at = time.time()
        if self._key is not None and not self.signature_ok(request.headers, body):
            self.bad_signatures += 1
        self.arrivals.append((request.path, request.headers.get("webhook-id", ""), arrived_at))
        self.last_at = arrived_at
        n = len(self.arrivals)
        if self._waiters:
            for target, future in self._waiters:
                if n >= target and not future.done():
                    future.set_result(None)
            self._waiters = [(t, f) for t, f in self._waiters if not f.done()]
        return web.Response(text="ok")

    def stats(self) -> dict[str, object]:
        """Cheap enough to poll every second; duplicates are counted from ``arrivals``."""
        return {
            "count": len(self.arrivals),
            "bad_signatures": self.bad_signatures,
            "first_at": self.arrivals[0][2] if self.arrivals else None,
            "last_at": self.last_at,
        }

    async def wait(self, request: web.Request) -> web.Response:
        target = int(request.query["count"])
        timeout_s = float(request.query.get("timeout_s", "60"))
        if len(self.arrivals) < target:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiters.append((target, future))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(future, timeout_s)
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def get_stats(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def get_arrivals(self, _request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.arrivals), content_type="application/json")

    async def reset(self, _request: web.Request) -> web.Response:
        self.arrivals = []
        self.bad_signatures = 0
        self.last_at = None
        return web.Response(text="ok")


async def serve(port: int, secret: str | None) -> None:
    recorder = Recorder(secret)
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_get(CONTROL + "wait", recorder.wait)
    app.router.add_get(CONTROL + "stats", recorder.get_stats)
    app.router.add_get(CONTROL + "arrivals", recorder.get_arrivals)
    app.router.add_post(CONTROL + "reset", recorder.reset)
    app.router.add_post("/{tail:.*}", recorder.hook)
    runner = web.AppRunner(app, access_log=None, handle_signals=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=1024)
    await site.start()
    sockets = site._server.sockets  # type: ignore[union-attr]
    print(f"READY {sockets[0].getsockname()[1]}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--secret", default=None, help="whsec_... to verify every signature")
    args = parser.parse_args()
    try:
        uvloop.run(serve(args.port, args.secret))
    except KeyboardInterrupt:
        sys.exit(0)


if __name__ == "__main__":
    main()
