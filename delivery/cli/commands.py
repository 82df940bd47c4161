"""The commands that run the platform or feed it: migrate, run / relay / worker, demo; and the
table of every command (the operator's commands are in ``operations``, publish in ``publish``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Awaitable, Callable
from typing import Any

import structlog

from delivery.cli.operations import cmd_dlq, cmd_secrets, cmd_status, cmd_subscriptions
from delivery.cli.output import EXIT_OK, _emit
from delivery.cli.publish import cmd_publish
from delivery.cli.tenants import cmd_keys, cmd_tenants
from delivery.settings import Settings, unknown_variables

log = structlog.get_logger("delivery.cli")


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store.migrations import migrate, migrations_dir, status

    directory = migrations_dir(args.dir or settings.migrations_dir)
    if args.status:
        for row in await status(settings.database_url, directory):
            when = row.applied_at.isoformat(timespec="seconds") if row.applied_at else ""
            sys.stdout.write(f"{row.state:<8} {row.file:<40} {when}".rstrip() + "\n")
        return EXIT_OK
    applied = await migrate(settings.database_url, directory)
    _emit({"applied": [f"{m.version:04d}_{m.name}" for m in applied]})
    return EXIT_OK


async def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.ops.logs import configure_logging
    from delivery.runner import process_runner

    run_process = process_runner()
    configure_logging(settings.log_format, settings.log_level, no_color=settings.no_color)
    for warning in unknown_variables():
        log.warning("unknown_setting", warning=warning)
    role = args.command
    await run_process(settings, relay=role in ("run", "relay"), worker=role in ("run", "worker"))
    return EXIT_OK


async def cmd_api(_args: argparse.Namespace, settings: Settings) -> int:
    from delivery.api.server import serve_api
    from delivery.ops.logs import configure_logging

    configure_logging(settings.log_format, settings.log_level, no_color=settings.no_color)
    for warning in unknown_variables():
        log.warning("unknown_setting", warning=warning)
    await serve_api(settings)
    return EXIT_OK


async def cmd_demo(args: argparse.Namespace, settings: Settings | None) -> int:
    from delivery.demo.run import run_demo
    from delivery.settings import load_settings
    from delivery.store.migrations import migrations_dir

    # The demo provisions its own services; of the settings it needs only where migrations are.
    chosen = (settings or load_settings(require=())).migrations_dir
    return await run_demo(events=args.events, keep=args.keep, migrations=migrations_dir(chosen))


_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], Awaitable[int]]] = {
    "migrate": cmd_migrate,
    "run": cmd_process,
    "relay": cmd_process,
    "worker": cmd_process,
    "publish": cmd_publish,
    "subscriptions": cmd_subscriptions,
    "secrets": cmd_secrets,
    "dlq": cmd_dlq,
    "status": cmd_status,
    "tenants": cmd_tenants,
    "keys": cmd_keys,
    "demo": cmd_demo,
    "api": cmd_api,
}
# The long-running processes: they log (structlog, in DELIVERY_LOG_FORMAT) rather than print.
_PROCESSES = frozenset({"run", "relay", "worker", "api"})
# What each command cannot run without.
_REQUIRES: dict[str, tuple[str, ...]] = {
    "run": ("database_url", "amqp_url"),
    "relay": ("database_url", "amqp_url"),
    "worker": ("database_url", "amqp_url"),
    "demo": (),
    "secrets": (),  # generate-key needs no database; rotate-key checks for its own
}
