"""`python -m bench.api_frameworks --help` works without the frameworks installed (they live in
a venv of their own) and explains every option."""

from __future__ import annotations

import argparse
import subprocess
import sys

from bench.api_frameworks import FRAMEWORKS, parser


def test_api_frameworks_help_explains_every_option():
    result = subprocess.run(
        [sys.executable, "-m", "bench.api_frameworks", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())
    actions = [a for a in parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert {a.option_strings[0] for a in actions} >= {"--quick", "--runs", "--frameworks"}
    for action in actions:
        name = action.option_strings[0]
        assert action.help and len(action.help.split()) >= 3, f"{name} has no real help text"
        assert name in result.stdout, name
    for framework in FRAMEWORKS:
        assert framework in shown


def test_api_frameworks_refuses_an_unknown_framework_with_exit_2():
    result = subprocess.run(
        [sys.executable, "-m", "bench.api_frameworks", "--frameworks", "flask"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "unknown framework flask" in result.stderr
