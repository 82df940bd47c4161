"""Real `delivery` processes (`python -m delivery relay|worker|run|api`) as signalable
subprocesses.

Each process has a stable name (``worker-1``), its own admin port (kept across restarts, so
``/metrics`` and ``/readyz`` stay where the scenario looks) and one log file in the run's out
dir that every incarnation appends to. Children die with the chaos runner (``PR_SET_PDEATHSIG``),
so an interrupted run leaves nothing behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Literal

import aiohttp

from chaos.metrics import parse_metrics

__all__ = ["ManagedProcess", "Role", "die_with_parent"]

Role = Literal["relay", "worker", "run", "api"]

_PR_SET_PDEATHSIG = 1
_READY_POLL_S = 0.1
_HTTP_TIMEOUT_S = 2.0


def die_with_parent() -> None:  # pragma: no cover - runs in the child, between fork and exec
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    """One named `delivery` process slot: start, kill -9, SIGTERM, start again."""

    def __init__(
        self, name: str, role: Role, env: Mapping[str, str], admin_port: int, log_path: Path
    ) -> None:
        self.name = name
        self.role = role
        self.admin_port = admin_port
        self.log_path = log_path
        self.starts = 0
        self.kills = 0
        self.exit_codes: list[int] = []
        self._env = dict(env)
        self._proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        if self.alive:
            return
        self._close_log()
        self._log = self.log_path.open("ab")
        self.starts += 1
        marker = f"--- chaos: start #{self.starts} of {self.name} at {time.time():.3f}\n"
        self._log.write(marker.encode())
        self._log.flush()
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "delivery",
            self.role,
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
            # Only prctl runs between fork and exec: no Python state is touched there.
            preexec_fn=die_with_parent,
        )

    async def kill(self) -> None:
        """kill -9 and reap."""
        if not self.alive:
            return
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGKILL)
        self.kills += 1
        await self._reap(10.0)

    async def terminate(self, timeout_s: float = 30.0) -> int | None:
        """SIGTERM (a graceful drain); SIGKILL if it has not exited by ``timeout_s``."""
        if not self.alive:
            return self._proc.returncode if self._proc is not None else None
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError):
            self._proc.send_signal(signal.SIGTERM)
        try:
            return await self._reap(timeout_s)
        except TimeoutError:
            await self.kill()
            return None

    async def _reap(self, timeout_s: float) -> int:
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), timeout_s)
        self.exit_codes.append(code)
        if self._log is not None:
            self._log.write(f"--- chaos: {self.name} exited {code} at {time.time():.3f}\n".encode())
            self._log.flush()
        return code

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        self._close_log()

    # -- observing --------------------------------------------------------------------------

    def _admin(self, path: str) -> str:
        return f"http://127.0.0.1:{self.admin_port}{path}"

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        if not self.alive:
            return False
        try:
            async with session.get(
                self._admin("/readyz"), timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S)
            ) as response:
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError, OSError):
            return False

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while not await self.ready(session):
            if not self.alive:
                raise RuntimeError(f"{self.name} exited during start-up (log {self.log_path})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready after {timeout_s:g}s ({self.log_path})")
            await asyncio.sleep(_READY_POLL_S)

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float] | None:
        """The process's /metrics as ``{"name{label=value}": value}``; None if unreachable."""
        if not self.alive:
            return None
        try:
            async with session.get(
                self._admin("/metrics"), timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S)
            ) as response:
                if response.status != 200:
                    return None
                return parse_metrics(await response.text())
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None
