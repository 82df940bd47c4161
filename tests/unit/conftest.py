"""Unit tests: no I/O at all, so they run anywhere, in any order, in milliseconds. A test here
that asks for a service fixture stops the run at collection (before any service starts); one
that opens a network connection, binds a socket or starts a process fails, naming what it did:
it belongs in tests/integration."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_SERVICE_FIXTURES = {"services", "template_db", "db_url", "settings"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    wrong = [
        f"{item.nodeid} ({', '.join(sorted(used))})"
        for item in items
        if _HERE in item.path.parents
        and (used := _SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
    ]
    if wrong:
        raise pytest.UsageError(f"unit tests asking for services: {'; '.join(wrong)}")


def _refused(what: str) -> Callable[..., None]:
    def refuse(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"a unit test {what}: it belongs in tests/integration")

    return refuse


@pytest.fixture(autouse=True)
def _no_io(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _refused("opened a network connection"))
    monkeypatch.setattr(socket.socket, "connect_ex", _refused("opened a network connection"))
    monkeypatch.setattr(socket.socket, "bind", _refused("bound a socket"))
    monkeypatch.setattr(subprocess.Popen, "__init__", _refused("started a process"))
