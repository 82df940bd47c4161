"""The admin server: on loopback unless DELIVERY_ADMIN_HOST says otherwise, the image's
healthcheck against it (and with the port off), the runbooks it serves where the alert rules'
runbook_url points, and the version its metrics and the webhooks' User-Agent carry."""

from __future__ import annotations

import asyncio
import importlib.metadata
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from delivery.bundled import bundled_dir
from delivery.ops.admin import serve_admin
from delivery.ops.health import Health
from delivery.testing.env import environment_without_settings
from delivery.testing.processes import free_port
from delivery.worker.sender import Sender

pytestmark = pytest.mark.integration

# Another loopback address: a server bound to 127.0.0.1 alone refuses it, one on 0.0.0.0 takes it.
OTHER_LOOPBACK = "127.0.0.2"


async def reachable(host: str, port: int) -> bool:
    try:
        _reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        return False
    writer.close()
    await writer.wait_closed()
    return True


async def test_the_admin_server_listens_on_loopback_unless_told_otherwise():
    port = free_port()
    async with serve_admin(Health(), port):
        assert await reachable("127.0.0.1", port)
        assert not await reachable(OTHER_LOOPBACK, port)
    port = free_port()
    async with serve_admin(Health(), port, "0.0.0.0"):
        assert await reachable(OTHER_LOOPBACK, port)


def healthcheck(**env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "delivery.ops.healthcheck"],
        env={**environment_without_settings(), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_the_healthcheck_probes_healthz_and_passes_with_the_port_off():
    port = free_port()
    async with serve_admin(Health(), port, "0.0.0.0"):
        up = await asyncio.to_thread(
            healthcheck, DELIVERY_ADMIN_HOST="0.0.0.0", DELIVERY_ADMIN_PORT=str(port)
        )
    assert up.returncode == 0, up.stderr
    down = await asyncio.to_thread(healthcheck, DELIVERY_ADMIN_PORT=str(port))
    assert down.returncode == 1
    assert f"127.0.0.1:{port}/healthz" in down.stderr and down.stderr.count("\n") == 1
    off = await asyncio.to_thread(healthcheck, DELIVERY_ADMIN_PORT="0")
    assert off.returncode == 0 and "admin port off" in off.stdout


async def test_the_admin_server_serves_the_shipped_runbooks_and_nothing_else():
    port = free_port()
    runbooks = sorted(bundled_dir("runbooks").glob("*.md"))
    async with serve_admin(Health(), port), aiohttp.ClientSession() as http:
        base = f"http://127.0.0.1:{port}/runbooks/"
        for path in runbooks:
            async with http.get(base + path.name) as answer:
                assert answer.status == 200, path.name
                assert await answer.text() == path.read_text()
        async with http.get(base) as index:
            assert await index.text() == (bundled_dir("runbooks") / "README.md").read_text()
        for name in ("nope.md", "..%2Fpyproject.toml", "%2E%2E%2FREADME.md", "README.txt"):
            async with http.get(base + name) as answer:
                assert answer.status == 404, name


async def test_the_metric_and_the_user_agent_carry_the_installed_version():
    installed = importlib.metadata.version("delivery-webhooks")
    seen: list[str] = []

    async def hook(request: web.Request) -> web.Response:
        seen.append(request.headers["user-agent"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    hook_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", hook_port).start()
    admin_port = free_port()
    try:
        async with (
            serve_admin(Health(), admin_port),
            aiohttp.ClientSession() as http,
            Sender(
                max_connections=1,
                connect_timeout_s=2,
                timeout_s=5,
                excerpt_bytes=0,
                allow_private_targets=True,  # the test hook is on loopback
            ) as sender,
        ):
            async with http.get(f"http://127.0.0.1:{admin_port}/metrics") as answer:
                exposition = await answer.text()
            result = await sender.post(f"http://127.0.0.1:{hook_port}/hook", {}, b"{}")
    finally:
        await runner.cleanup()
    assert f'delivery_build_info{{version="{installed}"}} 1.0' in exposition
    assert result.status == 204
    assert seen == [f"delivery-webhooks/{installed}"]
