"""What the demo shows while it runs: narration and the progress bars, on standard error."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass, field

from delivery.testing.receiver import Receiver


def say(line: str) -> None:
    sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


def _bar(done: int, total: int, width: int = 24) -> str:
    filled = min(width, width * done // total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "]"


@dataclass
class _Progress:
    """Redrawn in place on a terminal (10 times a second); elsewhere one line a second."""

    receiver: Receiver
    total_events: int
    total_deliveries: int
    published: int = 0
    tty: bool = field(default_factory=sys.stderr.isatty)

    def line(self) -> str:
        delivered = self.receiver.delivered_count()
        return (
            f"  {_bar(self.published, self.total_events)} "
            f"{self.published:>{len(f'{self.total_events:,}')},}/{self.total_events:,} published"
            f"   {_bar(delivered, self.total_deliveries)} "
            f"{delivered:>{len(f'{self.total_deliveries:,}')},}/{self.total_deliveries:,}"
            " delivered"
        )

    def draw(self) -> None:
        sys.stderr.write(("\r" + self.line()) if self.tty else (self.line() + "\n"))
        sys.stderr.flush()

    async def run(self, done: asyncio.Event) -> None:
        interval_s = 0.1 if self.tty else 1.0
        while not done.is_set():
            self.draw()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), interval_s)
        self.draw()
        if self.tty:
            sys.stderr.write("\n")
