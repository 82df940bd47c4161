"""The subprocesses of a session (a system's processes, the receiver): their environment, how
they are started, paused, resumed and stopped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Sequence
from pathlib import Path

from bench.measure import tree_pids

REPO = Path(__file__).resolve().parent.parent
STOP_TIMEOUT_S = 30.0


def env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Our environment without any DELIVERY_* or BENCH_* setting, this checkout first on the
    import path, then ``extra``."""
    out = {k: v for k, v in os.environ.items() if not k.startswith(("DELIVERY_", "BENCH_"))}
    out["PYTHONPATH"] = str(REPO) + (
        os.pathsep + out["PYTHONPATH"] if out.get("PYTHONPATH") else ""
    )
    out.update(extra or {})
    return out


async def spawn(
    args: Sequence[str], environ: dict[str, str], log: Path
) -> asyncio.subprocess.Process:
    """Start ``args`` in its own session (so a signal reaches its whole tree), output to ``log``."""
    with open(log, "ab") as out:  # noqa: ASYNC230
        return await asyncio.create_subprocess_exec(
            *args,
            cwd=REPO,
            env=environ,
            stdout=out,
            stderr=out,
            stdin=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )


async def terminate(procs: Sequence[asyncio.subprocess.Process]) -> None:
    """SIGTERM (after SIGCONT: a paused tree cannot act on it), then SIGKILL to the whole tree
    of any process not gone within ``STOP_TIMEOUT_S``."""
    for p in procs:
        if p.returncode is None:
            signal_tree(p.pid, signal.SIGCONT)
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            await asyncio.wait_for(p.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            signal_tree(p.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(p.wait(), 10)


def signal_tree(root: int, sig: signal.Signals) -> None:
    for pid in tree_pids([root]):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
