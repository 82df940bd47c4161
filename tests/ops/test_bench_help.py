"""`python -m bench run --help` explains every option: no option without help text, and each
option's help is what the real command prints."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from bench.run import parser


def test_every_bench_option_is_explained_by_run_help():
    result = subprocess.run(
        [sys.executable, "-m", "bench", "run", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    shown = " ".join(result.stdout.split())  # argparse wraps the help at the terminal's width
    actions = [a for a in parser()._actions if not isinstance(a, argparse._HelpAction)]
    assert actions
    for action in actions:
        name = action.option_strings[0] if action.option_strings else action.dest
        assert action.help and len(action.help.split()) >= 3, f"{name} has no real help text"
        assert " ".join(action.help.split()) in shown, f"{name}'s help is not in run --help"
        if action.option_strings:
            assert re.search(rf"(^|\s){re.escape(name)}\b", result.stdout), name
