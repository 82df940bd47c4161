"""The admin HTTP server of a long-running process: /metrics, /healthz, /readyz."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from delivery.errors import ConfigError
from delivery.ops.health import Health


def build_app(health: Health) -> web.Application:
    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        return web.json_response(health.report(), status=200 if health.ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@contextlib.asynccontextmanager
async def serve_admin(health: Health, port: int, host: str = "0.0.0.0") -> AsyncIterator[int]:  # noqa: S104
    """Serve until the block exits; yields the bound port (0 = off, yields 0)."""
    if port == 0:
        yield 0
        return
    runner = web.AppRunner(build_app(health), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"DELIVERY_ADMIN_PORT: cannot listen on port {port}: {exc.strerror}"
        ) from None
    try:
        yield port
    finally:
        await runner.cleanup()
