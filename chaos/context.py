"""What a running scenario can see and touch, handed to its fault plan."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from chaos.cluster import Cluster
from chaos.metrics import MetricsSampler
from chaos.producer import Producer
from chaos.prometheus import RunPrometheus
from delivery.testing.receiver import Receiver
from delivery.testing.waits import wait_until

__all__ = ["FaultLog", "FaultWindow", "RunContext"]


@dataclass
class FaultWindow:
    kind: str
    target: str
    start: float  # wall clock (time.time())
    end: float | None = None
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "target": self.target,
            "start": self.start,
            "end": self.end,
            "detail": self.detail,
        }


@dataclass
class FaultLog:
    windows: list[FaultWindow] = field(default_factory=list)

    @contextlib.asynccontextmanager
    async def window(self, kind: str, target: str, detail: str = "") -> AsyncIterator[FaultWindow]:
        """Record the fault from entry to exit (exit = the fault is over, not the recovery)."""
        win = FaultWindow(kind, target, time.time(), detail=detail)
        self.windows.append(win)
        try:
            yield win
        finally:
            win.end = time.time()

    def close_open(self) -> None:
        for win in self.windows:
            if win.end is None:
                win.end = time.time()

    @property
    def last_end(self) -> float | None:
        ends = [w.end for w in self.windows if w.end is not None]
        return max(ends, default=None)


@dataclass
class RunContext:
    cluster: Cluster
    producer: Producer
    receiver: Receiver
    faults: FaultLog
    sampler: MetricsSampler
    session: aiohttp.ClientSession
    rng: random.Random
    # Facts a scenario wants in its report (e.g. the backlog seen during a memory alarm).
    notes: dict[str, Any] = field(default_factory=dict)
    ready_at: float = field(default_factory=time.monotonic)  # every process ready, topology up
    # Alert rules scaled by this for short runs (chaos.alerts): plans whose faults are sized for
    # an alert's timing scale their durations with it.
    alert_scale: float = 1.0
    # The run's Prometheus (scenarios with alert expectations): a plan may wait for an alert.
    prometheus: RunPrometheus | None = None
    # Dead letters the plan itself skipped (`delivery dlq skip`): (event id, subscription
    # path) -> the event's sequence. The checker expects them undelivered, not lost.
    skipped: dict[tuple[str, str], int] = field(default_factory=dict)

    @property
    def production_s(self) -> float:
        """How long production takes at the base rate (fault durations scale with it)."""
        return self.producer.total / self.producer.base_rate

    @property
    def producing(self) -> bool:
        return not self.producer.done.is_set()

    async def progress(self, fraction: float, timeout_s: float = 600.0) -> None:
        """Wait until this fraction of all events has committed (or production ended)."""
        want = int(self.producer.total * fraction)
        await wait_until(
            lambda: len(self.producer.record.committed_at) >= want or not self.producing,
            timeout_s=timeout_s,
            what=f"{fraction:.0%} of the events committed",
        )

    async def uptime(self, seconds: float) -> None:
        """Wait until the platform has run for ``seconds`` (a precondition, not a result: a
        RabbitMQ 3.10 quorum queue killed within ~1 s of its declaration may never elect a
        leader again, which would test RabbitMQ rather than us)."""
        await asyncio.sleep(max(0.0, self.ready_at + seconds - time.monotonic()))

    async def until_firing(self, names: frozenset[str], cap_s: float) -> bool:
        """Hold a fault until every alert in ``names`` fires (Prometheus says so), at most
        ``cap_s``: a fault that must outlast an alert's ``for:`` lasts no longer than that.
        True when they all fired; without a Prometheus, False after ``cap_s``."""
        deadline = time.monotonic() + cap_s
        while time.monotonic() < deadline:
            if self.prometheus is not None and names <= await self.prometheus.firing(self.session):
                return True
            await asyncio.sleep(0.5)
        return False

    async def pause(self, low_s: float, high_s: float) -> None:
        """A fault's own duration or spacing (random within bounds): not a wait for a result."""
        await asyncio.sleep(self.rng.uniform(low_s, high_s))
