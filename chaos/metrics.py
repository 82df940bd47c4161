"""Reading the processes' Prometheus metrics: parse, and sample over a run."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

__all__ = ["MetricsSampler", "Sample", "parse_metrics"]

# The gauges a chaos run follows over time (cluster-wide values: the max over processes),
# by name prefix so that labelled series (``delivery_queue_messages{queue=...}``) are kept.
WATCHED = (
    "delivery_outbox_pending",
    "delivery_outbox_oldest_age_seconds",
    "delivery_queue_messages",
    "delivery_deliveries_pending",
    "delivery_lag_seconds",
    "delivery_ordered_blocked_accounts",
)


def parse_metrics(text: str) -> dict[str, float]:
    """``{"name" or "name{k=v,...}": value}`` for every sample in a Prometheus text page."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name
            if sample.labels:
                key += "{" + ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items())) + "}"
            values[key] = float(sample.value)
    return values


class _Scrapable(Protocol):
    name: str

    async def metrics(self, session: aiohttp.ClientSession) -> dict[str, float] | None: ...


@dataclass(frozen=True)
class Sample:
    at: float  # wall clock, time.time()
    values: dict[str, float]  # WATCHED name -> max over the processes that answered


@dataclass
class MetricsSampler:
    """Scrape the watched gauges every ``interval_s`` until stopped."""

    processes: Callable[[], Sequence[_Scrapable]]
    interval_s: float = 0.5
    samples: list[Sample] = field(default_factory=list)

    async def run(self, session: aiohttp.ClientSession, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.sample_once(session)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval_s)

    async def sample_once(self, session: aiohttp.ClientSession) -> Sample:
        pages = await asyncio.gather(*(p.metrics(session) for p in self.processes()))
        values: dict[str, float] = {}
        for page in pages:
            if page is None:
                continue
            for name, value in page.items():
                if name.startswith(WATCHED):
                    values[name] = max(values.get(name, 0.0), value)
        sample = Sample(at=time.time(), values=values)
        self.samples.append(sample)
        return sample

    def max_of(self, name: str, since: float = 0.0, until: float = float("inf")) -> float:
        seen = [s.values[name] for s in self.samples if since <= s.at <= until and name in s.values]
        return max(seen, default=0.0)

    def maxima(self) -> dict[str, float]:
        """The highest value of every watched series over the run."""
        highest: dict[str, float] = {}
        for sample in self.samples:
            for name, value in sample.values.items():
                highest[name] = max(highest.get(name, value), value)
        return dict(sorted(highest.items()))

    def last_of(self, name: str) -> float | None:
        for sample in reversed(self.samples):
            if name in sample.values:
                return sample.values[name]
        return None
