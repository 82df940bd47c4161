"""``delivery run`` finds the process through the installed entry point, never by importing
workers/ (pure: reads the installed package's metadata, no services)."""

from __future__ import annotations

from importlib.metadata import EntryPoints

import pytest

import workers.process
from delivery import runner
from delivery.errors import ConfigError


def test_the_installed_package_registers_the_workers_process_as_its_runner():
    # Fails in an environment installed before the entry point existed: reinstall it.
    assert runner.process_runner() is workers.process.run_process


def test_without_a_registered_runner_the_lookup_fails_in_one_line_naming_the_entry_point(
    monkeypatch,
):
    monkeypatch.setattr(runner, "entry_points", lambda **_selection: EntryPoints(()))
    with pytest.raises(ConfigError) as raised:
        runner.process_runner()
    message = str(raised.value)
    assert "\n" not in message
    assert "'run'" in message and "'delivery.process'" in message
    assert "pip install" in message
