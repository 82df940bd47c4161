"""The ``delivery`` command line. Exit codes: 0 success, 2 bad input or usage, 1 anything else.
Errors are one readable line on stderr (a traceback only with ``--debug``).

``parser`` builds the arguments, ``commands`` and ``operations`` hold the commands, ``output``
the exit codes and printing; ``main`` (the ``delivery`` entry point) ties them together.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import traceback
from collections.abc import Awaitable

from delivery.cli.commands import _COMMANDS, _PROCESSES, _REQUIRES
from delivery.cli.output import EXIT_FAILURE, EXIT_USAGE
from delivery.cli.parser import build_parser
from delivery.errors import ConfigError, InputError, QuotaExceededError
from delivery.settings import Settings, load_settings, unknown_variables


def _run_loop(main: Awaitable[int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return int(asyncio.run(main))  # type: ignore[arg-type]
    return int(uvloop.run(main))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command not in _PROCESSES:  # a long-running process logs them, in its log format
        for warning in unknown_variables():
            sys.stderr.write(f"delivery {args.command}: warning: {warning}\n")
    try:
        settings: Settings | None = None
        if args.command != "demo":
            settings = load_settings(
                require=_REQUIRES.get(args.command, ("database_url",)),
                admin_port=getattr(args, "admin_port", None),
                api_host=getattr(args, "host", None),
                api_port=getattr(args, "port", None),
            )
        return _run_loop(_COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        return 130
    # Over a quota is the caller's to fix (remove something, or raise the quota): usage, 2.
    except (InputError, ConfigError, QuotaExceededError) as exc:
        _report(args, exc, str(exc))
        return EXIT_USAGE
    except Exception as exc:
        _report(args, exc, _describe(exc))
        return EXIT_FAILURE


def _report(args: argparse.Namespace, exc: BaseException, line: str) -> None:
    """One line on stderr; with ``--debug`` the traceback first (the exit code stays the same)."""
    if args.debug:
        traceback.print_exception(exc)
    sys.stderr.write(f"delivery {args.command}: {line}\n")


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
