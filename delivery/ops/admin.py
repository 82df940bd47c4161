"""The admin HTTP server of a long-running process: /metrics, /healthz, /readyz, and the
on-call runbooks the package ships (/runbooks/NAME.md), where the alert rules' runbook_url
points (ops/prometheus/alerts.yml)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from delivery.bundled import bundled_dir
from delivery.errors import ConfigError
from delivery.ops.health import Health

_RUNBOOK = re.compile(r"^[A-Za-z0-9-]+\.md$")


def build_app(health: Health, runbooks: Path | None = None) -> web.Application:
    runbooks_dir = runbooks or bundled_dir("runbooks")

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"content-type": CONTENT_TYPE_LATEST})

    async def healthz(_request: web.Request) -> web.Response:
        # Answering at all proves the event loop is alive.
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        return web.json_response(health.report(), status=200 if health.ready else 503)

    async def runbook(request: web.Request) -> web.Response:
        name = request.match_info.get("name", "README.md")
        # Only names from the shipped directory: no path ever leaves it.
        path = runbooks_dir / name
        if not _RUNBOOK.match(name) or not path.is_file():
            raise web.HTTPNotFound(text=f"no runbook {name}\n")
        return web.Response(text=path.read_text(), content_type="text/markdown")

    app = web.Application()
    app.router.add_get("/runbooks/", runbook)
    app.router.add_get("/runbooks/{name}", runbook)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


@contextlib.asynccontextmanager
async def serve_admin(health: Health, port: int, host: str = "127.0.0.1") -> AsyncIterator[int]:
    """Serve on ``host`` (DELIVERY_ADMIN_HOST) until the block exits; yields the bound port
    (0 = off, yields 0)."""
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
            f"DELIVERY_ADMIN_HOST/DELIVERY_ADMIN_PORT: cannot listen on {host}:{port}:"
            f" {exc.strerror}"
        ) from None
    try:
        yield port
    finally:
        await runner.cleanup()
