"""The operator's commands, each on one database connection: subscriptions, secrets, dlq,
status."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from delivery.cli.output import EXIT_FAILURE, EXIT_OK, _emit, _progress
from delivery.errors import ConfigError, InputError
from delivery.settings import Settings

if TYPE_CHECKING:
    from delivery.secrets import SecretBox


async def _with_conn(settings: Settings, work: Callable[[Any], Awaitable[int]]) -> int:
    import asyncpg

    conn = await asyncpg.connect(settings.database_url)
    try:
        return await work(conn)
    finally:
        await conn.close()


def _tenant(args: argparse.Namespace) -> str:
    """``--tenant``, checked as typed (``default`` when not given)."""
    from delivery.store.tenants import DEFAULT_TENANT, parse_tenant_id

    return parse_tenant_id(args.tenant if args.tenant is not None else DEFAULT_TENANT)


async def _tenant_exists(conn: Any, tenant_id: str) -> None:
    """``NotFoundError`` naming the tenant: an unknown one is an error, not an empty listing."""
    from delivery.store import tenants

    await tenants.get(conn, tenant_id)


def _print_subscription(sub: Any, as_json: bool, *, with_secret: bool = False) -> None:
    data = sub.public_dict(with_secret=with_secret)
    if as_json or with_secret:
        _emit(data)
        return
    for key, value in data.items():
        sys.stdout.write(f"{key:>28}: {value}\n")


def _secret(args: argparse.Namespace) -> str | None:
    """``--secret``, or the secret in ``--secret-file`` (standard input with ``-``), so it need
    never show on a command line (``ps``, shell history)."""
    path: str | None = args.secret_file
    given: str | None = args.secret
    if path is None:
        return given
    if path == "-":
        text = sys.stdin.read()
    else:
        try:
            with open(path, encoding="utf-8") as stream:
                text = stream.read()
        except OSError as exc:
            raise InputError(f"--secret-file: {path}: {exc.strerror}") from None
    secret = text.strip()
    if not secret:
        raise InputError(f"--secret-file: {'standard input' if path == '-' else path} is empty")
    return secret


async def cmd_subscriptions(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store import subscriptions as subs
    from delivery.store.secret_keys import open_box

    tenant_id = _tenant(args)

    async def work(conn: Any) -> int:
        # Every action writes or shows secrets (an Ed25519 public key comes from its secret).
        box = await open_box(conn, settings)
        await _tenant_exists(conn, tenant_id)
        if args.action == "add":
            return await _add_subscription(conn, args, settings, box, tenant_id)
        if args.action == "list":
            return await _list_subscriptions(conn, args, box, tenant_id)
        subscription_id = subs.parse_subscription_id(args.id)
        return await _act_on_subscription(
            conn, args, settings, subscription_id, box=box, tenant_id=tenant_id
        )

    return await _with_conn(settings, work)


async def _add_subscription(
    conn: Any, args: argparse.Namespace, settings: Settings, box: SecretBox, tenant_id: str
) -> int:
    from delivery.durations import parse_schedule_s
    from delivery.store import subscriptions as subs
    from delivery.targets import check_target

    schedule = None
    if args.retry_schedule is not None:
        try:
            schedule = parse_schedule_s(args.retry_schedule)
        except ValueError as exc:
            raise InputError(f"--retry-schedule: {exc}") from None
    url = subs.validate_url(args.url)
    if not settings.allow_private_targets:
        await check_target(url)
    # The answer is made before the commit: if it cannot be, nothing was written.
    async with conn.transaction():
        sub = await subs.add(
            conn,
            tenant_id=tenant_id,
            url=url,
            patterns=args.events,
            account_id=args.account,
            secret=_secret(args),
            retry_schedule_s=schedule,
            timeout_s=args.timeout,
            signing=args.signing,
            ordered=args.ordered,
            box=box,
        )
        answer = sub.public_dict(with_secret=True)
    _emit(answer)
    return EXIT_OK


async def _list_subscriptions(
    conn: Any, args: argparse.Namespace, box: SecretBox, tenant_id: str
) -> int:
    from delivery.store import subscriptions as subs
    from delivery.targets import mask_url

    items = await subs.list_all(conn, box=box, tenant_id=tenant_id)
    if args.json:
        _emit([s.public_dict() for s in items])
        return EXIT_OK
    sys.stdout.write(f"{'ID':<21} {'STATE':<9} {'EVENTS':<30} {'ACCOUNT':<12} URL\n")
    for s in items:
        events = ",".join(s.event_patterns)
        account = s.account_id or "*"
        sys.stdout.write(
            f"{s.id:<21} {s.state:<9} {events:<30} {account:<12} {mask_url(s.url)}\n"
        )
    return EXIT_OK


async def _act_on_subscription(
    conn: Any,
    args: argparse.Namespace,
    settings: Settings,
    subscription_id: str,
    *,
    box: SecretBox,
    tenant_id: str,
) -> int:
    from delivery.store import subscriptions as subs
    from delivery.store.dead_letters import park_pending
    from delivery.store.states import SubscriptionState

    action = args.action
    if action == "show":
        _print_subscription(
            await subs.get(conn, subscription_id, box=box, tenant_id=tenant_id), args.json
        )
    elif action in ("disable", "enable"):
        disable = action == "disable"
        state = SubscriptionState.DISABLED if disable else SubscriptionState.ACTIVE
        async with conn.transaction():
            sub = await subs.set_state(
                conn,
                subscription_id,
                state,
                reason="disabled by operator",
                box=box,
                tenant_id=tenant_id,
            )
            if disable:
                await park_pending(conn, subscription_id, "subscription disabled by operator")
        _print_subscription(sub, args.json)
    elif action in ("pause", "resume"):
        from delivery.store import pausing

        move = pausing.pause if action == "pause" else pausing.resume
        _print_subscription(
            await move(conn, subscription_id, box=box, tenant_id=tenant_id), args.json
        )
    elif action == "replay":
        from delivery.store import replays

        since = replays.parse_moment(args.since, "--since")
        until = replays.parse_moment(args.until, "--until")
        replayed = await replays.replay_window(
            conn, subscription_id, since, until, tenant_id=tenant_id
        )
        _emit({"replayed": replayed})
    elif action == "rotate-secret":
        async with conn.transaction():  # as for add: no new secret unless it can be shown
            sub = await subs.rotate_secret(
                conn,
                subscription_id,
                grace_s=settings.secret_rotation_grace_s,
                box=box,
                tenant_id=tenant_id,
            )
            answer = sub.public_dict(with_secret=True)
        _emit(answer)
    elif action == "remove":
        await subs.remove(
            conn, subscription_id, keep_history=not args.delete_history, tenant_id=tenant_id
        )
        kept = "deleted" if args.delete_history else "kept"
        if args.json:
            _emit({"removed": subscription_id, "history": kept})
        else:
            sys.stdout.write(f"removed {subscription_id} (history {kept})\n")
    return EXIT_OK


async def cmd_secrets(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.secrets import SecretBox, generate_key
    from delivery.store.secret_keys import rotate_key

    if args.action == "generate-key":
        _emit({"key": generate_key()})
        return EXIT_OK
    if not settings.database_url:  # not required up front: generate-key needs no database
        raise ConfigError("DELIVERY_DATABASE_URL is not set")
    box = SecretBox.from_text(settings.secrets_key.get_secret_value())

    async def work(conn: Any) -> int:
        _emit((await rotate_key(conn, box)).as_dict())
        return EXIT_OK

    return await _with_conn(settings, work)


async def cmd_dlq(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.events import format_timestamp
    from delivery.store import dead_letters as dlq
    from delivery.store import subscriptions as subs
    from delivery.store.pool import create_pool

    tenant_id = _tenant(args)
    subscription_id = None
    if args.subscription is not None:
        subscription_id = subs.parse_subscription_id(args.subscription)

    async def exists(conn: Any) -> int:
        # An unknown tenant or subscription is an error, not "none".
        await _tenant_exists(conn, tenant_id)
        if subscription_id is not None:
            await subs.exists(conn, subscription_id, tenant_id=tenant_id)
        return EXIT_OK

    await _with_conn(settings, exists)

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
            items = await dlq.list_dead(
                conn, subscription_id=args.subscription, limit=args.limit, tenant_id=tenant_id
            )
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
        ids=dlq.ids_from_args(args.ids),
        subscription_id=args.subscription,
        everything=args.all,
        tenant_id=tenant_id,
    )
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    try:
        if args.action == "replay":
            replayed, skipped = await dlq.replay(pool, selector, progress=_progress("replayed"))
            _emit({"replayed": replayed, "skipped_disabled_subscription": skipped})
        elif args.action == "skip":
            _emit({"skipped": await dlq.skip(pool, selector, progress=_progress("skipped"))})
        else:
            if not args.yes and not await _confirm_purge(await dlq.count(pool, selector)):
                sys.stderr.write("delivery dlq purge: not confirmed; nothing was purged\n")
                return EXIT_FAILURE
            purged = await dlq.purge(pool, selector, progress=_progress("purged"))
            _emit({"purged": purged})
    finally:
        await pool.close()
    return EXIT_OK


async def _confirm_purge(count: int) -> bool:
    """Ask on the terminal before dropping dead letters for good. Without a terminal there is
    nobody to ask: refuse (exit 2) rather than guess, and name ``--yes``."""
    if count == 0:
        return True
    if not sys.stdin.isatty():
        raise InputError(
            "purge: standard input is not a terminal to confirm on; add --yes to purge"
        )
    sys.stderr.write(f"purge {count:,} dead letter(s) for good? [y/N] ")
    sys.stderr.flush()
    answer = await asyncio.to_thread(sys.stdin.readline)
    return answer.strip().lower() in ("y", "yes")


async def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.broker.depths import queue_report
    from delivery.broker.topology import Names
    from delivery.store.status import collect
    from delivery.store.unhealthy import format_age

    async def work(conn: Any) -> int:
        names = Names(settings.amqp_prefix)
        report = await collect(conn, lambda: queue_report(settings.amqp_url or None, names))
        # Not ok (the broker could not be asked) is exit 1, whatever the output's form.
        code = EXIT_OK if report["ok"] else EXIT_FAILURE
        if args.json:
            _emit(report)
            return code
        out = report["outbox"]
        sys.stdout.write(f"outbox: {out['pending']} pending, oldest {out['oldest_age_s']}s\n")
        if report["queues_error"] is not None:
            sys.stdout.write(f"queues: {report['queues_error']}\n")
        else:
            for name, depth in report["queues"].items():
                sys.stdout.write(f"queue {name}: {'missing' if depth is None else depth}\n")
        # The tenant last: the columns before it kept their places.
        sys.stdout.write(
            f"{'SUBSCRIPTION':<21} {'STATE':<9} {'PENDING':>8} {'RETRYING':>8} {'DEAD':>6} "
            f"{'DELIVERED':>9}  {'LAST SUCCESS':<32}  TENANT\n"
        )
        for s in report["subscriptions"]:
            sys.stdout.write(
                f"{s['id']:<21} {s['state']:<9} {s['pending']:>8} {s['retrying']:>8} "
                f"{s['dead']:>6} {s['delivered']:>9}  {s['last_success'] or '-':<32}  "
                f"{s['tenant_id']}\n"
            )
        blocked = sum(s["blocked_accounts"] for s in report["subscriptions"])
        if blocked:
            # An ordered subscription's account waits behind a dead letter until on-call
            # replays or skips it: name which, and how.
            sys.stdout.write(
                f"blocked accounts: {blocked} (ordered; `delivery dlq replay ID` or"
                " `delivery dlq skip ID` releases one)\n"
            )
            for b in report["blocked_accounts"]:
                sys.stdout.write(
                    f"  {b['subscription_id']} account {b['account_id']}: held at sequence"
                    f" {b['sequence']} by dead letter {b['dead_letter_id']} ({b['reason']})\n"
                )
        # Since when, and which alert covers it: what on-call needs to match a page to a cause.
        if report["unhealthy"]:
            sys.stdout.write(f"unhealthy: {len(report['unhealthy'])}\n")
        for u in report["unhealthy"]:
            alert = u["alert"] or "none"
            sys.stdout.write(
                f"  {u['kind']} {u['subject']}: {u['detail']}; since {u['since']}"
                f" ({format_age(u['age_s'])}); alert: {alert}\n"
            )
        return code

    return await _with_conn(settings, work)
