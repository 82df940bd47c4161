"""The stream feed's fan-out: each committed row reaches exactly the clients that asked for its
tenant, account and type, found through the feed's index rather than by asking every client.
Pure: rows are handed to the feed directly, no database."""

from __future__ import annotations

from datetime import UTC, datetime

from delivery.api.feed import Client, Feed
from delivery.api.stream_protocol import parse_subscribe
from delivery.settings import Settings


def _feed() -> Feed:
    settings = Settings(
        database_url="postgresql://nobody@127.0.0.1:1/none",
        amqp_url="amqp://nobody@127.0.0.1:1/",
        stream_max_clients_per_tenant=10,
    )
    return Feed(settings, pool=None)  # type: ignore[arg-type]  # _fan_out reads no database


def _client(feed: Feed, tenant: str, subscribe: str) -> Client:
    client = Client(tenant, parse_subscribe(subscribe), limit=100)
    assert feed.admit(client)
    return client


def _row(tenant: str, account: str, sequence: int, type_: str) -> dict[str, object]:
    return {
        "tenant_id": tenant,
        "account_id": account,
        "sequence": sequence,
        "type": type_,
        "event_id": f"evt_{tenant}_{account}_{sequence}",
        "occurred_at": datetime(2026, 12, 8, tzinfo=UTC),
        "data": '{"asset": "USD", "balance": "1"}',
        "created_at_s": 1_796_688_000.0,  # the outbox commit, which the feed reads for the SLI
    }


def _got(client: Client) -> list[tuple[str, int]]:
    return [(f.account_id, f.sequence) for f in client.frames]


def test_each_row_reaches_exactly_the_clients_of_its_tenant_account_and_type() -> None:
    # Given clients of one account, of two, of every account (trades only), and of another tenant
    feed = _feed()
    one = _client(feed, "t", '{"op": "subscribe", "accounts": ["a1"]}')
    two = _client(feed, "t", '{"op": "subscribe", "accounts": ["a1", "a2"]}')
    every = _client(feed, "t", '{"op": "subscribe", "types": ["trade.*"]}')
    other = _client(feed, "u", '{"op": "subscribe"}')
    # When rows of several accounts, types and tenants are fanned out
    feed._fan_out(_row("t", "a1", 1, "trade.executed"))
    feed._fan_out(_row("t", "a2", 1, "account.balance_changed"))
    feed._fan_out(_row("t", "a3", 1, "trade.executed"))
    feed._fan_out(_row("u", "a1", 1, "account.balance_changed"))
    # Then each client holds exactly what it subscribed to
    assert _got(one) == [("a1", 1)]
    assert _got(two) == [("a1", 1), ("a2", 1)]
    assert _got(every) == [("a1", 1), ("a3", 1)]
    assert _got(other) == [("a1", 1)]


def test_a_client_that_left_gets_nothing_and_leaves_no_entry_behind() -> None:
    # Given two clients sharing an account, and a client of every account
    feed = _feed()
    stays = _client(feed, "t", '{"op": "subscribe", "accounts": ["a1"]}')
    leaves = _client(feed, "t", '{"op": "subscribe", "accounts": ["a1", "a2"]}')
    every = _client(feed, "t", '{"op": "subscribe"}')
    # When one of them leaves, then a row of each account is fanned out
    feed.leave(leaves)
    feed._fan_out(_row("t", "a1", 1, "trade.executed"))
    feed._fan_out(_row("t", "a2", 1, "trade.executed"))
    # Then it got nothing, the others got theirs
    assert _got(leaves) == []
    assert _got(stays) == [("a1", 1)]
    assert _got(every) == [("a1", 1), ("a2", 1)]
    # And once all have left, the feed's index is empty again (no entry per account kept)
    feed.leave(stays)
    feed.leave(every)
    assert feed.count("t") == 0
    assert not feed._by_account and not feed._every_account
