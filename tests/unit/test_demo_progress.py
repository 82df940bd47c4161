"""The demo's progress line fits the terminal: at 80 columns whatever the totals, with bars
while they fit."""

from __future__ import annotations

import pytest

from delivery.demo.progress import _Progress


class _Delivered:
    """The one thing the progress line asks the receiver."""

    def __init__(self, count: int) -> None:
        self.count = count

    def delivered_count(self) -> int:
        return self.count


@pytest.mark.parametrize(
    ("events", "deliveries"),
    [(300, 900), (3_000, 9_000), (1_000_000, 3_000_000), (30_000_000, 90_000_000)],
)
@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_the_line_fits_80_columns(events, deliveries, fraction):
    progress = _Progress(
        receiver=_Delivered(int(deliveries * fraction)),  # type: ignore[arg-type]
        total_events=events,
        total_deliveries=deliveries,
        published=int(events * fraction),
        tty=True,
    )
    line = progress.line(80)
    assert len(line) < 80, line  # the last column stays free: no wrap on a redraw
    assert f"{events:,} published" in line and f"{deliveries:,} delivered" in line


def test_bars_grow_with_the_terminal_up_to_a_limit():
    progress = _Progress(_Delivered(4_500), total_events=3_000, total_deliveries=9_000, tty=True)  # type: ignore[arg-type]
    narrow, wide = progress.line(80), progress.line(200)
    assert narrow.count("[") == wide.count("[") == 2
    assert len(narrow) < len(wide) < 120
    assert "." * 12 in wide and "#" * 12 in wide  # 24 wide, half done for the deliveries


def test_the_live_balance_shows_beside_the_counts_while_it_fits():
    progress = _Progress(_Delivered(450), total_events=300, total_deliveries=900, tty=True)  # type: ignore[arg-type]
    progress.live = lambda: "acc_001 balance 10,070.37 USD"
    line = progress.line(80)
    assert len(line) < 80 and line.endswith("   acc_001 balance 10,070.37 USD"), line
    assert "450/900 delivered" in line
    # Where the counts leave no room, the balance goes and the counts stay.
    huge = _Progress(_Delivered(0), total_events=30_000_000, total_deliveries=90_000_000, tty=True)  # type: ignore[arg-type]
    huge.live = progress.live
    assert "balance" not in huge.line(80) and len(huge.line(80)) < 80
    assert "balance" in huge.line(120)
