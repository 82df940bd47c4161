"""The environment of the processes the tests and tools start, and whether this is CI.

A ``delivery`` subprocess must see only the settings its caller gives it: any ``DELIVERY_*``
variable left over from the caller's environment would silently override them.
"""

from __future__ import annotations

import os
from typing import Final

from delivery.settings import TEST_HARNESS_VARIABLE

# Under CI a missing service fails the tests that need it; locally it skips them.
IN_CI: Final = os.environ.get("CI", "").lower() == "true"


def environment_without_settings(*also: str) -> dict[str, str]:
    """This process's environment without the platform's ``DELIVERY_*`` settings (nor any
    variable starting with a prefix in ``also``): a child process then reads the settings its
    caller hands it and nothing from the shell that started the tests."""
    drop = ("DELIVERY_", *also)
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}


def harness_switches(**switches: str) -> dict[str, str]:
    """``DELIVERY_DANGEROUS_*`` variables for a process a test harness starts, with the marker
    without which the platform refuses them (``DELIVERY_TEST_HARNESS``)."""
    return {**switches, TEST_HARNESS_VARIABLE: "true"}
