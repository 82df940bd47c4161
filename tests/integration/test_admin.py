"""The admin server: on loopback unless DELIVERY_ADMIN_HOST says otherwise, the image's
healthcheck against it (and with the port off), and the runbooks it serves where the alert
rules' runbook_url points."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp
import pytest

from delivery.bundled import bundled_dir
from delivery.ops.admin import serve_admin
from delivery.ops.health import Health
from delivery.testing.env import environment_without_settings
from delivery.testing.processes import free_port

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
