"""The order test files start in, longest first, so that the two xdist workers finish together.

``./scripts/test`` runs ``pytest -n 2 --dist loadfile --no-loadscope-reorder``: each file goes
whole to one worker, in collection order, whenever a worker is nearly out of work. xdist's own
order (``--loadscope-reorder``, its default: most tests first) hands out the one-test files that
take minutes (the broker failover, the wheel build) among the last, where one can leave a worker
running it alone after the other has finished. Longest first (LPT) leaves short files for the
end: the unit layer, collected last, is a buffer of quick files that fills the gap.

``WEIGHTS_S`` orders, it asserts nothing: each file's wall seconds (setup, call and teardown of
all its tests) as measured on one loaded run, so only their order matters; a file not listed
counts as ``DEFAULT_S`` and keeps its collection place among those. Re-measure when a file grows
by much: a stale weight costs wall time, never a test.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

DEFAULT_S = 5.0

# Measured 2026-12-08 at 7daf1a2 under load 46-69 (seven sessions sharing the 2 cores), with
# `pytest -n 2 --dist loadfile` and a per-test timing log; the two largest are extrapolated
# from the part that ran before the run was stopped.
WEIGHTS_S: dict[str, float] = {
    # 10 of 84 mutants judged in ~15 min (two at a time)
    "tests/mutation/test_mutants.py": 7500,
    # 8 of 27 scenarios at 80-142 s each, plus 27 s to start its servers
    "tests/chaos/test_chaos.py": 2700,
    "tests/integration/test_bench_smoke.py": 262,
    "tests/integration/test_api_schemathesis.py": 195,  # its fuzzing hit the 180 s timeout
    "tests/integration/test_broker_failover.py": 168,
    "tests/integration/test_wheel.py": 95,
    "tests/integration/test_demo.py": 38,
    "tests/integration/test_fuzz_atheris.py": 22,
    "tests/integration/test_database_failover.py": 14,
}


class _Item(Protocol):
    @property
    def nodeid(self) -> str: ...


ItemT = TypeVar("ItemT", bound=_Item)


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def longest_first(items: Sequence[ItemT], weights_s: dict[str, float] = WEIGHTS_S) -> list[ItemT]:
    """``items`` with whole files ordered by weight, heaviest first; the order within a file,
    and between files of equal weight, is kept (module fixtures and parametrized cases rely on
    it)."""
    return sorted(items, key=lambda item: -weights_s.get(file_of(item.nodeid), DEFAULT_S))
