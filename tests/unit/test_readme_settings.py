"""The README's configuration table names every setting, and only settings: it cannot drift
from the Settings object."""

from __future__ import annotations

import re
from pathlib import Path

from delivery.settings import unknown_variables, variable_names

README = Path(__file__).resolve().parents[2] / "README.md"


def documented_variables() -> set[str]:
    """The variables in the first column of the table under ``## Configuration``."""
    section = README.read_text().split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    names: set[str] = set()
    for row in rows:
        first_cell = row.split("|")[1]
        names.update(re.findall(r"`([A-Z][A-Z0-9_]*)`", first_cell))
    return names


def test_the_readme_table_names_every_setting_and_nothing_else():
    documented = documented_variables()
    settings = set(variable_names().values())
    assert settings - documented == set(), "settings missing from the README's table"
    assert documented - settings == set(), "the README's table names variables no setting reads"


def test_a_mistyped_variable_gets_a_did_you_mean():
    env = {
        "DELIVERY_MAX_INFLIGHT": "64",
        "DELIVERY_SOMETHING_ELSE": "1",
        "DELIVERY_MAX_IN_FLIGHT": "64",
        "delivery_log_level": "info",  # read in any case: a setting
        "NO_COLOR": "1",
        "PATH": "/bin",
    }
    assert unknown_variables(env) == [
        "DELIVERY_MAX_INFLIGHT is not a setting and is ignored"
        " (did you mean DELIVERY_MAX_IN_FLIGHT?)",
        "DELIVERY_SOMETHING_ELSE is not a setting and is ignored",
    ]
