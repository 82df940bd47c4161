"""`delivery publish` on a large file: peak RSS and wall time by input size (flat memory is the
point: the command streams its input through a spool instead of holding it).

    python -m bench.publish_input                       # 10,000, 100,000 and 1,000,000 lines
    python -m bench.publish_input --lines 20000 --code /tmp/old-tree   # another tree's code

Needs DELIVERY_DATABASE_URL (an admin URL: each run gets its own database, dropped afterwards).
``--code DIR`` runs the command from another checkout's sources (``git archive main | tar -x -C
DIR``) to compare with an older implementation. Not a test: the figures go in bench/notes.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from delivery.store.migrations import migrate
from delivery.testing.services import ENV_DATABASE_URL, create_database, drop_database

_TYPES = (
    ("account.closed", {"reason": "requested"}),
    (
        "account.balance_changed",
        {"asset": "EUR", "delta": "-1.50", "balance": "98.50", "reason": "fee"},
    ),
    (
        "trade.executed",
        {
            "trade_id": "t",
            "order_id": "o",
            "instrument": "BTC-USD",
            "side": "buy",
            "quantity": "0.25",
            "price": "64000.50",
            "executed_at": "2026-11-23T10:00:00Z",
        },
    ),
)


def write_events(path: Path, lines: int) -> None:
    with path.open("wb") as out:
        for i in range(lines):
            kind, data = _TYPES[i % len(_TYPES)]
            event = {"id": f"evt_bench_{i:08d}", "type": kind, "account_id": f"acc_{i % 100}"}
            out.write(json.dumps({**event, "data": data}).encode() + b"\n")


def _rss_kb(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def run_publish(path: Path, db_url: str, code: str | None) -> dict[str, object]:
    env = {**os.environ, "DELIVERY_DATABASE_URL": db_url}
    if code:
        env["PYTHONPATH"] = code
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [sys.executable, "-m", "delivery", "publish", str(path)],
            stdout=out,
            stderr=err,
            env=env,
            cwd=code or None,
        )
        samples: list[int] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.5):
                rss = _rss_kb(proc.pid)
                if rss is not None:
                    samples.append(rss)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        # wait4: this child's own peak RSS (ru_maxrss, KiB on Linux), not the max over children.
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed_s = time.perf_counter() - started
        done.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise SystemExit(f"publish failed ({proc.returncode}): {stderr.decode()[-500:]}")
    quarters = [samples[int(len(samples) * q)] // 1024 for q in (0.25, 0.5, 0.75)]
    return {
        "result": json.loads(stdout),
        "seconds": round(elapsed_s, 1),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),
        "rss_mb_at_25_50_75_pct_of_run": quarters if samples else [],
        "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
    }


async def _bench(admin_url: str, lines: int, code: str | None) -> dict[str, object]:
    name = f"bench_publish_{os.getpid()}_{lines}"
    url = await create_database(admin_url, name)
    try:
        await migrate(url)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "events.jsonl"
            write_events(path, lines)
            size_mb = path.stat().st_size / 1e6
            result = await asyncio.to_thread(run_publish, path, url, code)
        return {"lines": lines, "file_mb": round(size_mb, 1), **result}
    finally:
        await drop_database(admin_url, name)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--code", help="run the command from this source tree instead")
    args = parser.parse_args()
    admin_url = os.environ.get(ENV_DATABASE_URL)
    if not admin_url:
        raise SystemExit(f"set {ENV_DATABASE_URL} (an admin URL of a PostgreSQL to bench on)")
    print(json.dumps({"load_at_start": os.getloadavg(), "code": args.code or "this checkout"}))
    for lines in sorted(args.lines):
        print(json.dumps(asyncio.run(_bench(admin_url, lines, args.code))), flush=True)


if __name__ == "__main__":
    main()
