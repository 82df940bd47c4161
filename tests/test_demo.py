"""The README's first command works: the demo delivers everything and verifies every signature."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_demo_delivers_every_event_with_verified_signatures(services):
    env = {k: v for k, v in os.environ.items() if not k.startswith("DELIVERY_")}
    # The session's services: the demo then works in a database and queue prefix of its own.
    env.update(DELIVERY_DATABASE_URL=services.database_url, DELIVERY_AMQP_URL=services.amqp_url)
    result = subprocess.run(
        [sys.executable, "-m", "delivery", "demo", "--events", "400"],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: every event delivered, every signature verified" in result.stdout
    assert "Traceback" not in result.stderr
    for label in ("trades", "balances", "everything"):
        assert label in result.stdout
