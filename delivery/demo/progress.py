"""What the demo shows while it runs: narration and the progress bars, on standard error."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

from delivery.testing.receiver import Receiver


def say(line: str) -> None:
    sys.stderr.write(f"  {line}\n")
    sys.stderr.flush()


def _bar(done: int, total: int, width: int) -> str:
    filled = min(width, width * done // total) if total else width
    return "[" + "#" * filled + "." * (width - filled) + "] "


def _count(done: int, total: int, what: str) -> str:
    return f"{done:>{len(f'{total:,}')},}/{total:,} {what}"


_GAP = "   "
_MAX_BAR = 24  # the widest a bar gets, however wide the terminal
_MIN_BAR = 5  # narrower than this, the bars are left out and the counts stay


@dataclass
class _Progress:
    """Redrawn in place on a terminal (10 times a second); elsewhere one line a second. The
    line fits the terminal's width (the bars shrink, then go), so a redraw never wraps."""

    receiver: Receiver
    total_events: int
    total_deliveries: int
    published: int = 0
    tty: bool = field(default_factory=sys.stderr.isatty)
    # What the live stream says, shown after the counts (a live balance); None: nothing.
    live: Callable[[], str] | None = None

    def line(self, columns: int) -> str:
        delivered = self.receiver.delivered_count()
        counts = (
            _count(self.published, self.total_events, "published"),
            _count(delivered, self.total_deliveries, "delivered"),
        )
        # The last column stays free: a line that fills it wraps on some terminals.
        room = columns - 1 - len("  ") - len(_GAP) - sum(len(c) for c in counts)
        live = self.live() if self.live is not None else ""
        tail = f"{_GAP}{live}" if live else ""
        if len(tail) > room:
            tail = ""  # no room for it beside the counts: the counts matter more
        room -= len(tail)
        width = min(_MAX_BAR, room // 2 - len("[] "))
        if width < _MIN_BAR:
            return "  " + _GAP.join(counts) + tail
        return (
            f"  {_bar(self.published, self.total_events, width)}{counts[0]}"
            f"{_GAP}{_bar(delivered, self.total_deliveries, width)}{counts[1]}{tail}"
        )

    def draw(self) -> None:
        line = self.line(shutil.get_terminal_size().columns)  # COLUMNS, the terminal, or 80
        # On a terminal: back to the line's start, the line, and erase what a longer one left.
        sys.stderr.write(f"\r{line}\x1b[K" if self.tty else line + "\n")
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
