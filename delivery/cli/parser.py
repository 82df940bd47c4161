"""The ``delivery`` command line's arguments (argparse only; the commands are elsewhere)."""

from __future__ import annotations

import argparse
from typing import NoReturn

from delivery.cli.output import EXIT_USAGE
from delivery.version import DISTRIBUTION, VERSION


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2: the contract's usage error.
        self.exit(EXIT_USAGE, f"delivery: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="delivery", description="Reliable signed webhook delivery.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"{DISTRIBUTION} {VERSION}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--dir", help="migrations directory (default: the bundled one)")
    migrate.add_argument(
        "--status", action="store_true", help="list applied and pending migrations; apply none"
    )

    for name, text in (
        ("run", "relay + workers in one process"),
        ("relay", "move outbox rows to RabbitMQ"),
        ("worker", "consume events and deliver webhooks"),
    ):
        proc = commands.add_parser(name, help=text)
        proc.add_argument("--admin-port", type=int, help="port for /metrics, /healthz, /readyz")

    publish = commands.add_parser("publish", help="publish JSON-lines events into the outbox")
    publish.add_argument("file", nargs="?", help="file of JSON lines (default: standard input)")

    subs = commands.add_parser("subscriptions", help="manage subscriptions")
    sub_actions = subs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = sub_actions.add_parser("add", help="add a subscription")
    add.add_argument("url")
    add.add_argument("--events", required=True, help="comma-separated globs: trade.*,account.*")
    add.add_argument("--account", help="only this account's events")
    add.add_argument("--secret", help="whsec_... (default: generated)")
    add.add_argument("--retry-schedule", help="e.g. 5s,5m,30m (default: DELIVERY_RETRY_SCHEDULE)")
    add.add_argument(
        "--timeout", type=float, help="seconds per attempt (default: DELIVERY_HTTP_TIMEOUT_S)"
    )
    add.add_argument("--json", action="store_true", help="(always JSON)")
    lst = sub_actions.add_parser("list", help="list subscriptions")
    lst.add_argument("--json", action="store_true")
    for action in ("show", "disable", "enable", "rotate-secret", "remove"):
        p = sub_actions.add_parser(action, help=f"{action} a subscription")
        p.add_argument("id")
        p.add_argument("--json", action="store_true")

    dlq = commands.add_parser("dlq", help="dead letters")
    dlq_actions = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dl = dlq_actions.add_parser("list", help="list dead letters")
    dl.add_argument("--subscription")
    dl.add_argument("--json", action="store_true")
    dl.add_argument("--limit", type=int, default=1000)
    dl.add_argument(
        "--poison", action="store_true", help="messages no worker could process, not deliveries"
    )
    for action in ("replay", "purge"):
        p = dlq_actions.add_parser(action, help=f"{action} dead letters")
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--subscription")
        p.add_argument("--all", action="store_true")

    status = commands.add_parser("status", help="backlog, queues and subscriptions at a glance")
    status.add_argument("--json", action="store_true")

    demo = commands.add_parser("demo", help="a whole run on this machine, to watch")
    demo.add_argument("--events", type=int, default=3000, help="how many events to publish")
    demo.add_argument("--keep", action="store_true", help="leave the throwaway services running")
    return parser
