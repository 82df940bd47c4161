"""The ``delivery`` command line. Exit codes: 0 success, 2 bad input or usage, 1 anything else.
Errors are one readable line on stderr (a traceback only with ``--debug``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TextIO

import orjson

from delivery.errors import ConfigError, InputError
from delivery.settings import Settings, load_settings

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, exit 2: the contract's usage error.
        self.exit(EXIT_USAGE, f"delivery: {message} (see `{self.prog} --help`)\n")


def _emit(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=None, default=str) + "\n")


def _progress(label: str) -> Callable[[int], None]:
    """Progress on stderr for long operations, only when a person is watching."""

    def report(done: int) -> None:
        if sys.stderr.isatty():
            sys.stderr.write(f"\r{label}: {done:,}")
            sys.stderr.flush()

    return report


# -- commands ----------------------------------------------------------------------------------


async def cmd_migrate(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store.migrations import DEFAULT_MIGRATIONS_DIR, migrate

    chosen = args.dir or settings.migrations_dir
    directory = Path(chosen) if chosen else DEFAULT_MIGRATIONS_DIR
    applied = await migrate(settings.database_url, directory)
    _emit({"applied": [f"{m.version:04d}_{m.name}" for m in applied]})
    return EXIT_OK


def _read_lines(stream: TextIO) -> Iterator[tuple[int, str]]:
    for number, line in enumerate(stream, start=1):
        if line.strip():
            yield number, line


async def cmd_publish(args: argparse.Namespace, settings: Settings) -> int:
    import asyncpg

    from delivery.events import NewEvent, parse_event
    from delivery.outbox import publish_many

    events: list[NewEvent] = []
    problems: list[str] = []
    with contextlib.ExitStack() as stack:
        if args.file in (None, "-"):
            stream: TextIO = sys.stdin
        else:
            try:
                # A local file read before any network I/O: blocking here is harmless.
                stream = stack.enter_context(open(args.file, encoding="utf-8"))  # noqa: ASYNC230
            except OSError as exc:
                raise InputError(f"{args.file}: {exc.strerror}") from None
        for number, line in _read_lines(stream):
            try:
                raw = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                problems.append(f"line {number}: invalid JSON: {exc}")
                continue
            try:
                events.append(parse_event(raw))
            except InputError as exc:
                problems.append(f"line {number}: {exc}")
    if problems:
        for problem in problems:
            sys.stderr.write(f"delivery publish: {problem}\n")
        sys.stderr.write(f"delivery publish: {len(problems)} bad line(s); nothing was written\n")
        return EXIT_USAGE
    conn = await asyncpg.connect(settings.database_url)
    published = duplicates = 0
    report = _progress("published")
    try:
        # One transaction for the whole input: all lines are written, or none.
        async with conn.transaction():
            for start in range(0, len(events), 1000):
                result = await publish_many(conn, events[start : start + 1000])
                published += len(result.published)
                duplicates += len(result.duplicates)
                report(published + duplicates)
    finally:
        await conn.close()
    if sys.stderr.isatty() and len(events) > 1000:
        sys.stderr.write("\n")
    _emit({"published": published, "duplicates": duplicates})
    return EXIT_OK


async def cmd_process(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.ops.logs import configure_logging
    from workers.process import run_process

    configure_logging(settings.log_format, settings.log_level)
    role = args.command
    await run_process(settings, relay=role in ("run", "relay"), worker=role in ("run", "worker"))
    return EXIT_OK


async def _with_conn(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _print_subscription(sub: Any, as_json: bool, *, with_secret: bool = False) -> None:
    data = sub.public_dict(with_secret=with_secret)
    if as_json or with_secret:
        _emit(data)
        return
    for key, value in data.items():
        sys.stdout.write(f"{key:>28}: {value}\n")


async def cmd_subscriptions(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.durations import parse_schedule_s
    from delivery.store import subscriptions as subs

    async def work(conn: Any) -> int:
        action = args.action
        if action == "add":
            schedule = None
            if args.retry_schedule:
                try:
                    schedule = parse_schedule_s(args.retry_schedule)
                except ValueError as exc:
                    raise InputError(f"--retry-schedule: {exc}") from None
            sub = await subs.add(
                conn,
                url=args.url,
                patterns=args.events,
                account_id=args.account,
                secret=args.secret,
                retry_schedule_s=schedule,
                timeout_s=args.timeout,
            )
            _print_subscription(sub, True, with_secret=True)
        elif action == "list":
            items = await subs.list_all(conn)
            if args.json:
                _emit([s.public_dict() for s in items])
            else:
                sys.stdout.write(f"{'ID':<21} {'STATE':<9} {'EVENTS':<30} {'ACCOUNT':<12} URL\n")
                for s in items:
                    events = ",".join(s.event_patterns)
                    sys.stdout.write(
                        f"{s.id:<21} {s.state:<9} {events:<30} {s.account_id or '*':<12} {s.url}\n"
                    )
        elif action == "show":
            _print_subscription(await subs.get(conn, args.id), args.json)
        elif action in ("disable", "enable"):
            state = "disabled" if action == "disable" else "active"
            async with conn.transaction():
                sub = await subs.set_state(conn, args.id, state, reason="disabled by operator")
                if state == "disabled":
                    await conn.execute(
                        """UPDATE delivery.deliveries SET state = 'dead', dead_at = now(),
                           dead_reason = 'subscription disabled by operator', lease_until = NULL
                           WHERE subscription_id = $1 AND state = 'pending'""",
                        args.id,
                    )
            _print_subscription(sub, args.json)
        elif action == "rotate-secret":
            sub = await subs.rotate_secret(conn, args.id, grace_s=settings.secret_rotation_grace_s)
            _print_subscription(sub, True, with_secret=True)
        elif action == "remove":
            await subs.remove(conn, args.id)
            _emit({"removed": args.id}) if args.json else sys.stdout.write(f"removed {args.id}\n")
        return EXIT_OK

    return await _with_conn(settings, work)


async def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.events import format_timestamp
    from delivery.store import dead_letters as dlq
    from delivery.store.pool import create_pool

    if args.action == "list":

        async def work(conn: Any) -> int:
            if args.poison:
                rows = await dlq.list_poison(conn, limit=args.limit)
                if args.json:
                    _emit(rows)
                else:
                    for row in rows:
                        sys.stdout.write(
                            f"{row['id']:<8} {row['received_at']}  {row['message_id'] or '-'}  "
                            f"{row['reason']}\n"
                        )
                return EXIT_OK
            items = await dlq.list_dead(conn, subscription_id=args.subscription, limit=args.limit)
            if args.json:
                _emit(
                    [
                        {
                            **item.__dict__,
                            **{
                                k: format_timestamp(v) if v is not None else None
                                for k, v in item.__dict__.items()
                                if k.endswith("_at")
                            },
                        }
                        for item in items
                    ]
                )
            else:
                sys.stdout.write(
                    f"{'ID':<8} {'SUBSCRIPTION':<21} {'EVENT':<34} {'ATTEMPTS':>8}  REASON\n"
                )
                for item in items:
                    sys.stdout.write(
                        f"{item.id:<8} {item.subscription_id:<21} {item.event_id:<34} "
                        f"{item.attempts:>8}  {item.reason}\n"
                    )
            return EXIT_OK

        return await _with_conn(settings, work)

    selector = dlq.Selector(
        ids=dlq.ids_from_args(args.ids), subscription_id=args.subscription, everything=args.all
    )
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        if args.action == "replay":
            replayed, skipped = await dlq.replay(pool, selector, progress=_progress("replayed"))
            _emit({"replayed": replayed, "skipped_disabled_subscription": skipped})
        else:
            purged = await dlq.purge(pool, selector, progress=_progress("purged"))
            _emit({"purged": purged})
    finally:
        await pool.close()
    return EXIT_OK


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.broker.depths import queue_report
    from delivery.broker.topology import Names
    from delivery.store.status import collect

    async def work(conn: Any) -> int:
        names = Names(settings.amqp_prefix)
        report = await collect(conn, lambda: queue_report(settings.amqp_url or None, names))
        if args.json:
            _emit(report)
            return EXIT_OK
        out = report["outbox"]
        sys.stdout.write(f"outbox: {out['pending']} pending, oldest {out['oldest_age_s']}s\n")
        queues = report["queues"]
        if isinstance(queues, dict):
            for name, depth in queues.items():
                sys.stdout.write(f"queue {name}: {'missing' if depth is None else depth}\n")
        else:
            sys.stdout.write(f"queues: {queues}\n")
        sys.stdout.write(
            f"{'SUBSCRIPTION':<21} {'STATE':<9} {'PENDING':>8} {'RETRYING':>8} {'DEAD':>6} "
            f"{'DELIVERED':>9}  LAST SUCCESS\n"
        )
        for s in report["subscriptions"]:
            sys.stdout.write(
                f"{s['id']:<21} {s['state']:<9} {s['pending']:>8} {s['retrying']:>8} "
                f"{s['dead']:>6} {s['delivered']:>9}  {s['last_success'] or '-'}\n"
            )
        return EXIT_OK

    return await _with_conn(settings, work)


async def cmd_demo(args: argparse.Namespace, settings: Settings | None) -> int:
    from delivery.demo.run import run_demo

    return await run_demo(events=args.events, keep=args.keep)


# -- parsing -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="delivery", description="Reliable signed webhook delivery.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    migrate = commands.add_parser("migrate", help="apply database migrations")
    migrate.add_argument("--dir", help="migrations directory (default: the bundled one)")

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


_COMMANDS: dict[str, Callable[[argparse.Namespace, Any], Awaitable[int]]] = {
    "migrate": cmd_migrate,
    "run": cmd_process,
    "relay": cmd_process,
    "worker": cmd_process,
    "publish": cmd_publish,
    "subscriptions": cmd_subscriptions,
    "dlq": cmd_dlq,
    "status": cmd_status,
    "demo": cmd_demo,
}
# What each command cannot run without.
_REQUIRES: dict[str, tuple[str, ...]] = {
    "run": ("database_url", "amqp_url"),
    "relay": ("database_url", "amqp_url"),
    "worker": ("database_url", "amqp_url"),
    "demo": (),
}


def _run_loop(main: Awaitable[int]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on every supported OS
        return int(asyncio.run(main))  # type: ignore[arg-type]
    return int(uvloop.run(main))  # type: ignore[arg-type]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings: Settings | None = None
        if args.command != "demo":
            settings = load_settings(
                require=_REQUIRES.get(args.command, ("database_url",)),
                admin_port=getattr(args, "admin_port", None),
            )
        return _run_loop(_COMMANDS[args.command](args, settings))
    except KeyboardInterrupt:
        return 130
    except (InputError, ConfigError) as exc:
        if args.debug:
            raise
        sys.stderr.write(f"delivery {args.command}: {exc}\n")
        return EXIT_USAGE
    except Exception as exc:
        if args.debug:
            raise
        sys.stderr.write(f"delivery {args.command}: {_describe(exc)}\n")
        return EXIT_FAILURE


def _describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
