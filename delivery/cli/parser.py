"""The ``delivery`` command line's arguments (argparse only; the commands are elsewhere)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any, NoReturn

from delivery.cli.output import EXIT_USAGE
from delivery.version import DISTRIBUTION, VERSION


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)

    def error(self, message: str) -> NoReturn:
        # One line, exit 2: the contract's usage error.
        self.exit(EXIT_USAGE, f"delivery: {message} (see `{self.prog} --help`)\n")


def _global_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """``--debug`` and ``--json`` before or after the subcommand: a subcommand's copy has no
    default, so it sets the value only when given and never resets the top-level one."""
    default: object = False if top else argparse.SUPPRESS
    parser.add_argument(
        "--debug", action="store_true", default=default, help="show tracebacks on errors"
    )
    parser.add_argument(
        "--json", action="store_true", default=default, help="machine-readable output"
    )


class _Subcommands(argparse._SubParsersAction):  # type: ignore[type-arg]
    """Every subcommand (at any depth) takes the global options too."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = super().add_parser(name, **kwargs)
        _global_options(parser, top=False)
        return parser


def _whole_number(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: ASCII digits only (``int`` also takes ``" 1_0 "`` and other scripts'
    digits), within ``low..high``."""

    def parse(text: str) -> int:
        if not (text.isascii() and text.isdigit() and len(text) <= 12) or not (
            low <= int(text) <= high
        ):
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number from {low} to {high}")
        return int(text)

    return parse


def _secrets_command(commands: Any) -> None:
    secrets = commands.add_parser("secrets", help="signing secrets at rest")
    actions = secrets.add_subparsers(dest="action", required=True, parser_class=_Parser)
    actions.add_parser(
        "rotate-key",
        help="seal plaintext secrets and move sealed ones to the first DELIVERY_SECRETS_KEY",
    )
    actions.add_parser("generate-key", help="print a new key for DELIVERY_SECRETS_KEY")


_ANY_QUOTA = 999_999_999_999


def _tenant_option(parser: argparse.ArgumentParser) -> None:
    # No default here: the command resolves it (`default`), so parsing stays free of the store.
    parser.add_argument("--tenant", metavar="ID", help="the tenant acted for (default: default)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="delivery", description="Reliable signed webhook delivery.")
    _global_options(parser, top=True)
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
        ("api", "the authenticated multi-tenant HTTP API"),
    ):
        proc = commands.add_parser(name, help=text)
        proc.add_argument(
            "--admin-port",
            type=_whole_number(0, 65535),
            help="port for /metrics, /healthz, /readyz",
        )
        if name == "api":
            proc.add_argument("--host", help="bind address (default: DELIVERY_API_HOST, 127.0.0.1)")
            proc.add_argument(
                "--port",
                type=_whole_number(0, 65535),
                help="port (default: DELIVERY_API_PORT, 8080)",
            )

    publish = commands.add_parser("publish", help="publish JSON-lines events into the outbox")
    publish.add_argument("file", nargs="?", help="file of JSON lines (default: standard input)")
    _tenant_option(publish)

    _subscriptions_parsers(commands)
    _secrets_command(commands)

    dlq = commands.add_parser("dlq", help="dead letters")
    dlq_actions = dlq.add_subparsers(dest="action", required=True, parser_class=_Parser)
    dl = dlq_actions.add_parser("list", help="list dead letters")
    _tenant_option(dl)
    dl.add_argument("--subscription")
    dl.add_argument("--limit", type=_whole_number(1, 10_000), default=1000)
    dl.add_argument(
        "--poison",
        action="store_true",
        help="messages no worker could process, not deliveries (the platform's: no tenant)",
    )
    replay = dlq_actions.add_parser("replay", help="send dead letters again (same webhook-id)")
    purge = dlq_actions.add_parser("purge", help="drop dead letters (asks first on a terminal)")
    skip = dlq_actions.add_parser(
        "skip",
        help="give up on dead letters, kept as skipped (releases an ordered subscription's"
        " account held behind them)",
    )
    for p in (replay, purge, skip):
        _tenant_option(p)
        p.add_argument("ids", nargs="*", metavar="ID")
        p.add_argument("--subscription")
        p.add_argument("--all", action="store_true")
    purge.add_argument(
        "--yes",
        "-y",
        action="store_true",
        help="do not ask (required when standard input is not a terminal)",
    )

    commands.add_parser("status", help="backlog, queues and subscriptions at a glance")
    _tenants_parsers(commands)

    demo = commands.add_parser("demo", help="a whole run on this machine, to watch")
    demo.add_argument(
        "--events", type=_whole_number(1, 1_000_000), default=3000, help="how many to publish"
    )
    demo.add_argument("--keep", action="store_true", help="leave the throwaway services running")
    return parser


def _tenants_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``delivery tenants ...`` and ``delivery keys ...``."""
    tenants = commands.add_parser("tenants", help="tenants and their quotas")
    actions = tenants.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = actions.add_parser("add", help="add a tenant")
    add.add_argument("name")
    # Digits only here; the quotas' ranges are the store's (delivery.store.tenants), one place.
    add.add_argument(
        "--max-events-per-s",
        type=_whole_number(0, _ANY_QUOTA),
        help="ingest rate over the API (default: unlimited)",
    )
    add.add_argument(
        "--max-subscriptions",
        type=_whole_number(0, _ANY_QUOTA),
        help="subscriptions it may hold, removed ones aside (default: unlimited)",
    )
    actions.add_parser("list", help="list tenants")
    actions.add_parser("show", help="show a tenant").add_argument("id")

    keys = commands.add_parser("keys", help="API keys")
    key_actions = keys.add_subparsers(dest="action", required=True, parser_class=_Parser)
    create = key_actions.add_parser("create", help="create a key (shown once)")
    create.add_argument("tenant_id", metavar="TENANT_ID")
    create.add_argument(
        "--scopes",
        default="publish,manage,read",
        help="comma-separated: publish,manage,read,operator (operator: on-call's view)",
    )
    key_actions.add_parser("list", help="list a tenant's keys").add_argument(
        "tenant_id", metavar="TENANT_ID"
    )
    key_actions.add_parser("revoke", help="revoke a key at once").add_argument(
        "key_id", metavar="KEY_ID"
    )


def _subscriptions_parsers(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """``delivery subscriptions ...``."""
    subs = commands.add_parser("subscriptions", help="manage subscriptions")
    sub_actions = subs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    add = sub_actions.add_parser("add", help="add a subscription")
    _tenant_option(add)
    add.add_argument("url")
    add.add_argument("--events", required=True, help="comma-separated globs: trade.*,account.*")
    add.add_argument("--account", help="only this account's events")
    given = add.add_mutually_exclusive_group()
    given.add_argument(
        "--secret",
        help="whsec_... (whsk_... with --signing ed25519; default: generated; visible in ps,"
        " prefer --secret-file)",
    )
    given.add_argument(
        "--secret-file",
        metavar="PATH",
        help="read the secret from this file, or from standard input with -",
    )
    add.add_argument(
        "--signing",
        choices=("hmac", "ed25519"),
        default="hmac",
        help="hmac: Standard Webhooks v1 (whsec_ secret, the default); ed25519: v1a (the"
        " subscriber verifies with the whpk_ public key shown)",
    )
    add.add_argument(
        "--ordered",
        action="store_true",
        help="per account, event N+1 waits until N was delivered, or its dead letter skipped",
    )
    add.add_argument("--retry-schedule", help="e.g. 5s,5m,30m (default: DELIVERY_RETRY_SCHEDULE)")
    add.add_argument(
        "--timeout", type=float, help="seconds per attempt (default: DELIVERY_HTTP_TIMEOUT_S)"
    )
    _tenant_option(sub_actions.add_parser("list", help="list subscriptions"))
    for action in ("show", "disable", "enable", "pause", "resume", "rotate-secret", "remove"):
        p = sub_actions.add_parser(action, help=f"{action} a subscription")
        _tenant_option(p)
        p.add_argument("id")
        if action == "remove":
            p.add_argument(
                "--delete-history",
                action="store_true",
                help="also delete its deliveries, attempts and dead letters (kept by default)",
            )

    again = sub_actions.add_parser(
        "replay", help="send a time window's matching events again (same webhook-id)"
    )
    _tenant_option(again)
    again.add_argument("id")
    for bound, text in (("since", "from (included)"), ("until", "to (excluded)")):
        again.add_argument(
            f"--{bound}",
            required=True,
            metavar="RFC3339",
            help=f"events committed {text} this moment, e.g. 2026-12-07T21:00:00Z",
        )
