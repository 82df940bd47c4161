"""How ``delivery run`` (and the demo) find the process they run.

The process is composed above the library, in ``workers.process.run_process`` (relay, dispatch,
scheduler and deliverer under one supervisor, signals, the drain). The library never imports it:
the package registers it as the entry point ``run`` of the group ``delivery.process``
(pyproject.toml), and this module looks it up, so every import points from workers/ down into
delivery/, never back up.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from importlib.metadata import entry_points
from typing import Any, Protocol, cast

from delivery.errors import ConfigError
from delivery.ops.health import Health
from delivery.settings import Settings

GROUP = "delivery.process"
NAME = "run"


class ProcessRunner(Protocol):
    """The signature of ``workers.process.run_process``."""

    def __call__(
        self,
        settings: Settings,
        *,
        relay: bool,
        worker: bool,
        stop: asyncio.Event | None = ...,
        ready: Callable[[Health], None] | None = ...,
        handle_signals: bool = ...,
        until_idle: bool = ...,
        idle_timeout_s: float = ...,
    ) -> Coroutine[Any, Any, None]: ...


def process_runner() -> ProcessRunner:
    """The installed process runner; ``ConfigError`` (one line) when none is registered."""
    found = entry_points(group=GROUP, name=NAME)
    if not found:
        raise ConfigError(
            f"no process runner is registered (entry point {NAME!r} of group {GROUP!r}):"
            " install the package again (pip install delivery-webhooks; pip install -e . in a"
            " checkout)"
        )
    return cast(ProcessRunner, next(iter(found)).load())
