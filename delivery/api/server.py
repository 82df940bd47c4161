"""The ``delivery api`` process: the lifecycle of ``delivery relay``/``worker``
(``workers.process``) for an HTTP server.

Start: the admin server (/metrics, /healthz, /readyz), then the database pool (waited for with
backoff, as the workers wait), then the API socket; ready once the pool answers. The first
SIGTERM/SIGINT marks the process not-ready and stops accepting; requests in flight get
``DELIVERY_SHUTDOWN_TIMEOUT_S`` to finish; then the pool closes and the process exits 0. A
second signal skips the rest of that wait: requests still in flight are cut off, their
connections closed (``delivery.lifecycle``).
"""

from __future__ import annotations

import asyncio

import asyncpg
import structlog
from aiohttp import web

from delivery.api.app import build_app
from delivery.api.feed import FEED, Feed, running_feed
from delivery.api.routes import ROUTES
from delivery.errors import ConfigError, StoppedBeforeConnected
from delivery.lifecycle import install_signals, open_pool, unless_forced
from delivery.ops.admin import serve_admin
from delivery.ops.health import Health
from delivery.settings import Settings
from delivery.store.secret_keys import open_box

log = structlog.get_logger("delivery.api.server")

_COMPONENT = "api"


async def serve_api(
    settings: Settings,
    *,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> None:
    """Serve until a signal (or ``stop``), then drain and return."""
    stop = stop or asyncio.Event()
    force = asyncio.Event()
    health = Health()
    health.register(_COMPONENT)
    remove_signals = install_signals(stop, force, health) if handle_signals else (lambda: None)
    try:
        async with serve_admin(health, settings.admin_port, settings.admin_host) as admin_port:
            try:
                pool = await open_pool(settings, stop)
            except StoppedBeforeConnected:
                log.info("stopped", role="api")
                return
            try:
                await _serve(settings, pool, health, stop=stop, force=force, admin_port=admin_port)
            finally:
                if force.is_set():
                    # Requests cut short by the forced stop may still hold connections, and
                    # close() would wait for them: close them under their feet instead.
                    pool.terminate()
                else:
                    await pool.close()
    finally:
        remove_signals()
    log.info("stopped", role="api")


async def _serve(
    settings: Settings,
    pool: asyncpg.Pool,
    health: Health,
    *,
    stop: asyncio.Event,
    force: asyncio.Event,
    admin_port: int,
) -> None:
    # aiohttp's drain: stop listening, then wait up to shutdown_timeout for requests in flight.
    async with pool.acquire() as conn:
        # As a worker does: refuse to start when a stored secret cannot be opened.
        box = await open_box(conn, settings)
    async with running_feed(settings, pool) as feed:
        app = build_app(ROUTES, pool, settings, box)
        app[FEED] = feed  # the live stream's one shared feed
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=settings.shutdown_timeout_s)
        await _run(
            settings,
            pool,
            runner,
            health=health,
            stop=stop,
            force=force,
            admin_port=admin_port,
            feed=feed,
        )


async def _run(
    settings: Settings,
    pool: asyncpg.Pool,
    runner: web.AppRunner,
    *,
    health: Health,
    stop: asyncio.Event,
    force: asyncio.Event,
    admin_port: int,
    feed: Feed,
) -> None:
    await runner.setup()
    site = web.TCPSite(runner, settings.api_host, settings.api_port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"DELIVERY_API_HOST/DELIVERY_API_PORT: cannot listen on"
            f" {settings.api_host}:{settings.api_port}: {exc.strerror}"
        ) from None
    try:
        await pool.fetchval("SELECT 1")
        health.set(_COMPONENT, True)
        log.info(
            "started",
            role="api",
            host=settings.api_host,
            port=settings.api_port,
            admin_port=admin_port or None,
        )
        await stop.wait()
        health.draining = True
    finally:
        health.set(_COMPONENT, False)
        feed.closing.set()  # stream clients are closed (1001), so the drain need not wait on them
        if not await unless_forced(runner.cleanup(), force):
            log.warning("drain_skipped", role="api")
