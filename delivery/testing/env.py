"""The environment of the processes the tests and tools start, and whether this is CI.

A ``delivery`` subprocess must see only the settings its caller gives it: any ``DELIVERY_*``
variable left over from the caller's environment would silently override them.
"""

from __future__ import annotations

import os
from typing import Final

# Under CI a missing service fails the tests that need it; locally it skips them.
IN_CI: Final = os.environ.get("CI", "").lower() == "true"


def scrubbed_env(*prefixes: str) -> dict[str, str]:
    """This process's environment without the ``DELIVERY_*`` variables (or, when ``prefixes``
    are given, without the variables that start with any of them)."""
    drop = prefixes or ("DELIVERY_",)
    return {k: v for k, v in os.environ.items() if not k.startswith(drop)}
