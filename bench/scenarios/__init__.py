# ruff: noqa: E501  (a table: one scenario a row)
"""The scenario catalogue: each ``--only`` name, what it measures, and the function that runs
it (one function may measure two names: ``flat`` and ``paced`` share their sessions). The
default run is every scenario but the opt-in ones, in this order."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bench.scenarios import backlog, compare, e2e, failures, profile, relay, scaling
from bench.sessions import Run

Scenario = Callable[[Run], Awaitable[None]]

# name: (what it measures, the function, part of the default run)
# fmt: off
CATALOGUE: dict[str, tuple[str, Scenario, bool]] = {
    "flat": ("every system: --events staged at its entry point, drained flat out", compare.compare, True),
    "paced": ("every system: --rate events/s for --paced-s, latency percentiles", compare.compare, True),
    "live": ("ours: flat out with the producer publishing while it runs", compare.live, True),
    "tuned": ("ours with a per-subscriber cap of 128: flat out and paced", compare.tuned, True),
    "processes": ("ours on N x delivery run, N in --process-counts", compare.processes, True),
    "fanout": ("ours with N subscriptions, N in --fanouts", compare.fanout, True),
    "relay": ("one relay draining --relay-rows rows from the outbox", relay.relay, True),
    "profile": ("py-spy on ours during a flat-out run (needs py-spy)", profile.profile, True),
    "backlog": ("ours draining --backlog events already in the outbox", backlog.backlog, True),
    "e2e": ("opt-in: ours with a live producer in batches of 100, see --e2e-*", e2e.e2e, False),
    "failures": ("opt-in: a 50%-failing and a hanging subscriber (minutes)", failures.failures, False),
    "scaling": ("opt-in: 1 relay + N workers (--process-counts) on a 3-node cluster and 1 node, CPU per kind", scaling.scaling, False),
}
# fmt: on

DEFAULT = [name for name, (_about, _run, default) in CATALOGUE.items() if default]


def selected(only: list[str]) -> list[Scenario]:
    """The functions to run for the names in ``only``, each once, in the catalogue's order."""
    out: list[Scenario] = []
    for name, (_about, scenario, _default) in CATALOGUE.items():
        if name in only and scenario not in out:
            out.append(scenario)
    return out
