"""``delivery api`` as a subprocess for tests, and a small client for it.

    async with api_process(env) as api:          # env: tests.support.settings_env(settings)
        async with api.client(key) as http:
            answer = await http.post("/v1/events", json=trade(1))

The process's log (JSON lines) goes to a file, not a pipe: an API under a property-based test
logs a line per request, and a pipe nobody reads would fill and stall it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from delivery.testing.processes import ProvisionError, free_port

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0


@dataclass
class ApiProcess:
    proc: asyncio.subprocess.Process
    port: int
    admin_port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def client(self, key: str | None = None) -> aiohttp.ClientSession:
        """A session on this API, sending ``key`` as the bearer token when given."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return aiohttp.ClientSession(base_url=self.url, headers=headers)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, and the exit code once it has drained."""
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.proc.wait(), timeout_s)


async def _ready(api: ApiProcess, deadline_s: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    async with aiohttp.ClientSession() as http:
        while loop.time() < end:
            if api.proc.returncode is not None:
                raise ProvisionError(
                    f"delivery api exited with {api.proc.returncode}: {api.log()[-2000:]}"
                )
            with contextlib.suppress(aiohttp.ClientError):
                async with http.get(api.admin_url + "/readyz") as answer:
                    if answer.status == 200:
                        return
            await asyncio.sleep(0.05)
    raise ProvisionError(f"delivery api was not ready within {deadline_s:g} s: {api.log()[-2000:]}")


@contextlib.asynccontextmanager
async def api_process(
    env: Mapping[str, str], *args: str, port: int | None = None
) -> AsyncIterator[ApiProcess]:
    """``python -m delivery api`` on free ports with ``env`` (on ``port`` when given: a restart
    its clients reconnect to), ready (``/readyz`` 200) when the block starts; stopped with
    SIGTERM (then killed, if it does not drain) when it ends."""
    port, admin_port = port or free_port(), free_port()
    with tempfile.TemporaryDirectory(prefix="delivery-api-") as tmp:
        log_path = Path(tmp) / "api.log"
        with log_path.open("wb") as log_file:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "delivery",
                "api",
                "--port",
                str(port),
                "--admin-port",
                str(admin_port),
                *args,
                env=dict(env),
                stdout=log_file,
                stderr=log_file,
            )
        api = ApiProcess(proc, port, admin_port, log_path)
        try:
            await _ready(api, START_TIMEOUT_S)
            yield api
        finally:
            if proc.returncode is None:
                try:
                    await api.stop()
                except TimeoutError:
                    proc.kill()
                    await proc.wait()
