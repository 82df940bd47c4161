"""What the command line prints and exits with: exit codes, JSON on standard output, progress
on standard error."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")


def _progress(label: str) -> Callable[[int], None]:
    """Progress on stderr for long operations, only when a person is watching."""

    def report(done: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{label}: {done:,}")
            sys.stderr.flush()

    return report
