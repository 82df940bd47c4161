"""Runbooks link the chaos scenarios that reproduce their failure: every `python -m chaos run`
they quote names a real scenario and parses with the chaos CLI, and every runbook ends with a
`## Reproduced by` section (the scenarios, or one line saying none reproduces it)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from chaos.cli import build_parser
from chaos.scenarios import SCENARIOS

ROOT = Path(__file__).resolve().parents[2]
RUNBOOKS = ROOT / "runbooks"
SECTION = "## Reproduced by"

# Which scenarios reproduce which runbook's failure. A runbook's section must list at least
# these; it may list more.
REPRODUCED_BY: dict[str, set[str]] = {
    "rabbitmq-down.md": {"rabbit-restart", "rabbit-kill", "amqp-cut", "amqp-stall", "partition"},
    "rabbitmq-blocked.md": {"memory-alarm", "disk-alarm"},
    "postgresql-down.md": {
        "pg-restart-fast",
        "pg-restart-immediate",
        "pg-down-long",
        "pg-terminate",
        "pg-cut",
        "partition",
    },
    "postgresql-slow.md": {"pg-stall", "slow-links"},
    "outbox-backlog.md": {"memory-alarm", "producer-spike"},
    "relay-stuck.md": {"kill-relays", "amqp-stall", "queue-deleted"},
    "subscriber-down.md": {"subscriber-flap"},
    "subscriber-slow.md": {"subscriber-flap"},
    "worker-crash-loop.md": {
        "kill-workers",
        "kill-single-node",
        "worker-pg-stall-kill",
        "rolling-sigterm",
    },
    "subscriber-duplicates.md": {"kill-workers", "pg-cut"},
    "scaling-out.md": {"producer-spike"},
    "delivery-lag.md": {"producer-spike", "burst"},
    "slo.md": {"producer-spike"},
    "poison-message.md": {"flaps-while-db-stalled"},
    "rolling-upgrade.md": {"rolling-sigterm"},
    "attempt-loop.md": {"attempt-loop"},
    "tenant-over-quota.md": {"tenant-over-quota"},
    "stream-clients-behind.md": {"stream-behind"},
    "database-failover.md": {"pg-failover"},
    "ordered-account-blocked.md": {"ordered-blocked"},
    "broker-node-lost.md": {"cluster-kill-node", "cluster-leader-stop", "cluster-rolling-restart"},
    "broker-partition.md": {"cluster-partition"},
}
# Operator procedures and failures no scenario causes: their section says so in one line.
NOT_REPRODUCED = {
    "dead-letters-growing.md",
    "subscriber-410.md",
    "subscriber-throttling.md",
    "leaked-signing-secret.md",
    "replay-after-incident.md",
}

_CHAOS_RUN = re.compile(r"\bpython3?\s+-m\s+chaos\s+run\b(.*)")


def _runbooks() -> list[Path]:
    return sorted(p for p in RUNBOOKS.glob("*.md") if p.name != "README.md")


def _section(text: str) -> str:
    """The `## Reproduced by` section: from its heading to the next `## ` heading or the end."""
    start = text.index(SECTION) + len(SECTION)
    following = re.search(r"^## ", text[start:], flags=re.MULTILINE)
    return text[start : start + following.start()] if following else text[start:]


def _code(text: str) -> list[str]:
    """Every line of a fenced block and every inline `code` span (one a span may wrap onto
    the next line of prose, so its whitespace is collapsed)."""
    code, prose, fenced = [], [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif fenced:
            code.append(line)
        else:
            prose.append(line)
    spans = re.findall(r"`([^`]+)`", "\n".join(prose))
    return code + [" ".join(span.split()) for span in spans]


def _chaos_commands(text: str) -> list[list[str]]:
    """argv after `python -m chaos` for each `python -m chaos run ...` quoted in ``text``."""
    return [
        ["run", *shlex.split(m.group(1), comments=True)]
        for snippet in _code(text)
        for m in _CHAOS_RUN.finditer(snippet)
    ]


def _scenarios(argv: list[str]) -> list[str]:
    return [str(name) for name in build_parser().parse_args(argv).scenarios]


def test_the_mapping_covers_every_runbook_and_names_real_scenarios():
    names = {p.name for p in _runbooks()}
    assert names == set(REPRODUCED_BY) | NOT_REPRODUCED, (
        "a runbook is missing from REPRODUCED_BY / NOT_REPRODUCED, or one listed there is gone"
    )
    assert not set(REPRODUCED_BY) & NOT_REPRODUCED
    for runbook, scenarios in REPRODUCED_BY.items():
        unknown = scenarios - set(SCENARIOS)
        assert not unknown, f"{runbook}: no such scenario {sorted(unknown)}"


def test_runbooks_quote_chaos_commands():
    # A guard against the extraction silently finding nothing.
    found = [argv for p in _runbooks() for argv in _chaos_commands(p.read_text())]
    assert len(found) >= sum(len(s) for s in REPRODUCED_BY.values()), found


@pytest.mark.parametrize("path", _runbooks(), ids=lambda p: p.name)
def test_every_chaos_command_in_a_runbook_names_a_real_scenario(path: Path, capsys):
    for argv in _chaos_commands(path.read_text()):
        shown = "python -m chaos " + shlex.join(argv)
        try:
            names = _scenarios(argv)
        except SystemExit:
            pytest.fail(f"{path.name}: `{shown}`: {capsys.readouterr().err.strip()}")
        for name in names:
            assert name in SCENARIOS, (
                f"{path.name}: `{shown}`: {name!r} is not a scenario (python -m chaos list)"
            )
            assert SCENARIOS[name].expect_valid, (
                f"{path.name}: `{shown}`: {name!r} is a deliberately broken build"
            )


@pytest.mark.parametrize("path", _runbooks(), ids=lambda p: p.name)
def test_every_runbook_says_what_reproduces_it(path: Path):
    text = path.read_text()
    assert text.count(f"\n{SECTION}\n") == 1, f"{path.name}: no single `{SECTION}` section"
    section = _section(text)
    listed = {name for argv in _chaos_commands(section) for name in _scenarios(argv)}
    # Commands live in the section only, so it is the one place to look.
    elsewhere = _chaos_commands(text.replace(section, ""))
    assert not elsewhere, f"{path.name}: chaos commands outside `{SECTION}`: {elsewhere}"
    if path.name in NOT_REPRODUCED:
        assert not listed, f"{path.name}: lists {sorted(listed)} but is in NOT_REPRODUCED"
        lines = [line for line in section.strip().splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("No chaos scenario"), (
            f"{path.name}: a runbook no scenario reproduces says so in one line: {lines}"
        )
        return
    missing = REPRODUCED_BY[path.name] - listed
    assert not missing, f"{path.name}: `{SECTION}` does not list {sorted(missing)}"
    for line in section.strip().splitlines():
        if line.startswith("- "):
            assert "python -m chaos run " in line, (
                f"{path.name}: each entry starts with its command: {line!r}"
            )


_UI_LINK = re.compile(r"\*\*On the web page:\*\* \[[^\]]+\]\(http://delivery-api/ui/#/([a-z/-]+)\)")


def test_every_runbook_links_the_part_of_the_web_page_that_shows_it():
    """A link to a view the page has: its routes, and for on-call an anchor it renders."""
    script = (ROOT / "delivery/api/ui/app.js").read_text()
    for path in _runbooks():
        found = _UI_LINK.search(path.read_text())
        assert found, f"{path.name}: no **On the web page:** link"
        view, _, section = found.group(1).partition("/")
        assert view in {"ops", "subscriptions", "dead-letters"}, path.name
        if section:
            assert view == "ops" and f'id: "{section}"' in script, (path.name, section)
