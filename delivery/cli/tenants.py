"""The platform operator's commands for tenants and their API keys: ``delivery tenants ...``
and ``delivery keys ...``. A key is printed once, at creation; only its hash is stored."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from delivery.cli.operations import _with_conn
from delivery.cli.output import EXIT_OK, _emit
from delivery.settings import Settings


async def cmd_tenants(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store import tenants

    async def work(conn: Any) -> int:
        if args.action == "add":
            tenant = await tenants.add(
                conn,
                args.name,
                max_events_per_s=args.max_events_per_s,
                max_subscriptions=args.max_subscriptions,
            )
            _emit(tenant.public_dict())
        elif args.action == "show":
            shown = await tenants.get(conn, tenants.parse_tenant_id(args.id))
            if args.json:
                _emit(shown.public_dict())
            else:
                _print_tenants([shown])
        else:
            listed = await tenants.list_all(conn)
            if args.json:
                _emit([t.public_dict() for t in listed])
            else:
                _print_tenants(listed)
        return EXIT_OK

    return await _with_conn(settings, work)


def _print_tenants(items: list[Any]) -> None:
    sys.stdout.write(f"{'ID':<21} {'NAME':<24} {'EVENTS/S':>9} {'MAX SUBS':>9}  CREATED\n")
    for t in items:
        rate = "-" if t.max_events_per_s is None else t.max_events_per_s
        subs = "-" if t.max_subscriptions is None else t.max_subscriptions
        created = t.created_at.isoformat(timespec="seconds")
        sys.stdout.write(f"{t.id:<21} {t.name:<24} {rate:>9} {subs:>9}  {created}\n")


async def cmd_keys(args: argparse.Namespace, settings: Settings) -> int:
    from delivery.store import keys, tenants

    async def work(conn: Any) -> int:
        if args.action == "create":
            tenant_id = tenants.parse_tenant_id(args.tenant_id)
            scopes = keys.parse_scopes(args.scopes)
            # The answer is made before the commit: a key nobody was shown is never stored.
            async with conn.transaction():
                listed, key = await keys.create(conn, tenant_id, scopes)
                answer = {"id": listed.id, "key": key, **_without_id(listed.public_dict())}
            _emit(answer)
        elif args.action == "list":
            items = await keys.list_for(conn, tenants.parse_tenant_id(args.tenant_id))
            if args.json:
                _emit([k.public_dict() for k in items])
            else:
                sys.stdout.write(f"{'ID':<21} {'SCOPES':<22} {'CREATED':<26} REVOKED\n")
                for k in items:
                    sys.stdout.write(
                        f"{k.id:<21} {','.join(k.scopes):<22} "
                        f"{k.created_at.isoformat(timespec='seconds'):<26} "
                        f"{k.revoked_at.isoformat(timespec='seconds') if k.revoked_at else '-'}\n"
                    )
        else:
            revoked = await keys.revoke(conn, keys.parse_key_id(args.key_id))
            _emit(revoked.public_dict())
        return EXIT_OK

    return await _with_conn(settings, work)


def _without_id(listed: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in listed.items() if k != "id"}
