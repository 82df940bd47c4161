"""Waiting for a condition with a deadline: tests never sleep and hope."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable


async def wait_until(
    condition: Callable[[], object], *, timeout_s: float, what: str, interval_s: float = 0.05
) -> None:
    """Poll a (sync or async) condition until it holds; ``TimeoutError`` naming ``what`` once
    ``timeout_s`` has passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(interval_s)
