"""A real Prometheus for a chaos run: it scrapes every platform process of the run (their admin
ports, which survive restarts) and evaluates ``ops/prometheus/alerts.yml`` (scaled for short
runs: ``chaos.alerts.scale_rules``); afterwards the run reads the alerts' timeline back from its
``ALERTS`` series. Debian's ``prometheus`` binary (``.ci/run`` installs it on clean machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aiohttp

from chaos.alerts import Episode, episodes, scale_rules
from chaos.processes import ManagedProcess, die_with_parent
from delivery.testing.processes import free_port

__all__ = ["ALERT_RULES", "RunPrometheus", "find_binary", "running_prometheus"]

ALERT_RULES = Path(__file__).resolve().parents[1] / "ops" / "prometheus" / "alerts.yml"
_HOST = "127.0.0.1"
_READY_TIMEOUT_S = 30.0
_HTTP_TIMEOUT_S = 10.0


def find_binary() -> str | None:
    found = shutil.which("prometheus")
    if found is None and Path("/usr/bin/prometheus").exists():
        found = "/usr/bin/prometheus"
    return found


@dataclass
class RunPrometheus:
    base_url: str
    interval_s: float
    scale: float
    started_at: float
    rules: Path

    async def alert_episodes(self, session: aiohttp.ClientSession, end: float) -> list[Episode]:
        """Every alert episode from the start of the run until ``end``, from ``ALERTS``."""
        params = {
            "query": "ALERTS",
            "start": f"{self.started_at:.3f}",
            "end": f"{end:.3f}",
            "step": f"{self.interval_s:g}",  # seconds (a duration string needs whole units)
        }
        async with session.get(
            f"{self.base_url}/api/v1/query_range",
            params=params,
            timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S),
        ) as response:
            if response.status != 200:
                text = await response.text()
                raise RuntimeError(f"prometheus query_range ALERTS: {response.status} {text}"[:300])
            body: dict[str, Any] = await response.json(content_type=None)
        if body.get("status") != "success":
            raise RuntimeError(f"prometheus query_range ALERTS failed: {body}"[:300])
        return episodes(body["data"]["result"], self.interval_s, end)

    async def firing(self, session: aiohttp.ClientSession) -> set[str]:
        """The alerts firing now (names); empty when Prometheus does not answer."""
        try:
            async with session.get(
                f"{self.base_url}/api/v1/query",
                params={"query": 'ALERTS{alertstate="firing"}'},
                timeout=aiohttp.ClientTimeout(total=_HTTP_TIMEOUT_S),
            ) as response:
                body: dict[str, Any] = await response.json(content_type=None)
            return {r["metric"]["alertname"] for r in body["data"]["result"]}
        except (aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError):
            return set()


@contextlib.asynccontextmanager
async def running_prometheus(
    binary: str,
    directory: Path,
    processes: Sequence[ManagedProcess],
    session: aiohttp.ClientSession,
    *,
    scale: float,
    rules: Path = ALERT_RULES,
    scaled: Collection[str] | None = None,
    scrape_s: float | None = None,
) -> AsyncIterator[RunPrometheus]:
    """Prometheus on 127.0.0.1 scraping ``processes`` and evaluating the scaled rules every
    ``interval_s`` (1 s; 0.5 s for a run whose rules are all scaled below half); killed on
    exit.
    ``rules``: another rules file (the chaos CLI's ``--rules``: show the checker failing a
    run whose rules lack an expected alert). ``scaled``: scale only these alerts' rules.
    ``scrape_s``: scrape (and time out) this often instead (a long `for:` over a gauge: one
    scrape of every process failing at once, which a 1 s timeout on a loaded machine makes
    common, resets the alert's clock)."""
    # Scraping every 0.5 s (with a 0.5 s timeout) read as targets down on a machine at load
    # 50; the rules scaled for the short runs are only those expected to fire, whose
    # shortest `for:` is still seconds.
    interval_s = 1.0 if scale >= 0.5 or scaled is not None else 0.5
    config = _write_config(
        directory,
        processes,
        rules,
        scale=scale,
        interval_s=interval_s,
        scaled=scaled,
        scrape_s=scrape_s or interval_s,
    )
    web_port = free_port()
    base_url = f"http://{_HOST}:{web_port}"
    with _log_file(directory) as log:
        proc = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={directory / 'tsdb'}",
            f"--web.listen-address={_HOST}:{web_port}",
            "--storage.tsdb.retention.time=1d",
            "--log.level=warn",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            preexec_fn=die_with_parent,
        )
    try:
        await _wait_ready(session, base_url, proc, targets=len(processes), interval_s=interval_s)
        yield RunPrometheus(base_url, interval_s, scale, started_at=time.time(), rules=rules)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()


def _log_file(directory: Path) -> IO[bytes]:
    return (directory / "prometheus.log").open("ab")


def _write_config(
    directory: Path,
    processes: Sequence[ManagedProcess],
    source: Path,
    *,
    scale: float,
    interval_s: float,
    scaled: Collection[str] | None,
    scrape_s: float,
) -> Path:
    """The scaled rules and a config scraping every process; returns the config's path."""
    directory.mkdir(parents=True, exist_ok=True)
    rules = directory / "alerts.yml"
    rules.write_text(scale_rules(source.read_text(), scale, scaled))
    config = directory / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {
                    "scrape_interval": f"{scrape_s * 1000:.0f}ms",
                    "scrape_timeout": f"{scrape_s * 1000:.0f}ms",
                    "evaluation_interval": f"{interval_s * 1000:.0f}ms",
                },
                "rule_files": [str(rules)],
                "scrape_configs": [
                    {
                        "job_name": "delivery",
                        "static_configs": [
                            {
                                "targets": [f"{_HOST}:{p.admin_port}"],
                                "labels": {"process": p.name},
                            }
                            for p in processes
                        ],
                    }
                ],
            }
        )
    )
    return config


async def _wait_ready(
    session: aiohttp.ClientSession,
    base_url: str,
    proc: asyncio.subprocess.Process,
    *,
    targets: int,
    interval_s: float,
) -> None:
    """Until every target was scraped up and the rules evaluated once with them: the run's
    faults start after that, so no alert is pending only because nothing was scraped yet."""
    deadline = time.monotonic() + _READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"prometheus exited {proc.returncode} at start-up")
        # Until it is up, Prometheus answers 503 "Service Unavailable" (plain text).
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, KeyError, ValueError):
            async with session.get(
                f"{base_url}/api/v1/query",
                params={"query": "count(up == 1)"},
                timeout=aiohttp.ClientTimeout(total=2),
            ) as response:
                body = await response.json(content_type=None)
            result = body["data"]["result"]
            if result and int(float(result[0]["value"][1])) >= targets:
                await asyncio.sleep(2 * interval_s)  # the rules see them once at least
                return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"prometheus not scraping {targets} targets after {_READY_TIMEOUT_S:g} s")
