"""``profile``: py-spy on our worker during a flat-out run, and the sample shares it found (self
and inclusive, by frame and by package). py-spy must be installed beside the Python that runs
the bench (``pip install py-spy``)."""

from __future__ import annotations

import asyncio
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from bench.ours import Ours
from bench.sessions import Run, flat_out, say, with_system
from bench.system import System


async def profile_session(db: str, amqp: str, n: int, out_dir: Path) -> dict[str, Any]:
    raw = out_dir / "profile.raw.txt"
    spy: list[asyncio.subprocess.Process] = []

    async def on_start(system: System) -> None:
        py_spy = str(Path(sys.executable).with_name("py-spy"))
        spy.append(
            await asyncio.create_subprocess_exec(
                py_spy, "record", "--pid", str(system.roots[0]), "--rate", "200",
                "--format", "raw", "--output", str(raw), "--nonblocking",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            )
        )  # fmt: skip

    async def on_end(_system: System) -> None:
        spy[0].send_signal(signal.SIGINT)
        await asyncio.wait_for(spy[0].wait(), 60)

    async def body(system: System) -> dict[str, Any]:
        result = await flat_out(system, n, on_start=on_start, on_end=on_end)
        return {"flat": result, "raw": str(raw), **analyse_profile(raw)}

    return await with_system(Ours(db, amqp), {}, body)


def analyse_profile(raw: Path) -> dict[str, Any]:
    """Self and inclusive sample shares from py-spy's raw (collapsed stacks) output."""
    self_counts: Counter[str] = Counter()
    incl_counts: Counter[str] = Counter()
    package_counts: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [f for f in stack.split(";") if f and not f.startswith(("process ", "thread "))]
        if not frames:
            continue
        total += count
        self_counts[_short(frames[-1])] += count
        package_counts[_package(frames[-1])] += count
        for frame in {_short(f) for f in frames}:
            incl_counts[frame] += count

    def share(counter: Counter[str], k: int, only: tuple[str, ...] = ()) -> list[list[Any]]:
        rows = [(f, c) for f, c in counter.most_common() if not only or f.startswith(only)]
        return [[f, c, 100 * c / total] for f, c in rows[:k]]

    # The entry points (cli, __main__, the supervisor) hold every sample: not informative.
    for frame in [f for f in incl_counts if f.startswith(("delivery/cli/", "delivery/__main__"))]:
        del incl_counts[frame]
    return {
        "samples": total,
        "self_top": share(self_counts, 25),
        "inclusive_ours": share(incl_counts, 25, ("delivery/", "workers/")),
        "inclusive_libraries": share(
            incl_counts, 15, ("aiormq/", "aio_pika/", "pamqp/", "asyncpg/", "aiohttp/")
        ),
        "packages": share(package_counts, 15),
    }


def _short(frame: str) -> str:
    """``func (path/to/site-packages/pkg/mod.py:12)`` -> ``pkg/mod.py:func``."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{path}:{name}"


def _package(frame: str) -> str:
    short = _short(frame)
    path = short.split(":", 1)[0]
    if path.startswith(("delivery/", "workers/")):
        return path.split("/")[0] + "/ (ours)"
    top = path.split("/", 1)[0]
    if top.endswith(".py") or top in {"asyncio", "concurrent", "json", "logging"}:
        return "stdlib/" + top
    return top


async def profile(run: Run) -> None:
    await run.quiet()
    say("profile: py-spy on ours during a flat-out run")
    out_dir = Path(tempfile.mkdtemp(prefix="bench-profile-"))
    run.results["profile"] = await profile_session(run.db, run.amqp, run.args.events, out_dir)
    run.save()
