"""Hostile replies and bad rows: every attempt ends in a recorded outcome, nothing loops, and one
bad row never fails its neighbours. On the real services, against subscribers that answer what
real ones do (nginx's gzip, NUL bytes, a garbled or absurd ``Retry-After``, a redirect)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import pytest
from aiohttp import web

from delivery import publish_many
from delivery.settings import Settings
from delivery.store import dead_letters as dlq
from delivery.store import subscriptions
from delivery.store.pool import create_pool
from delivery.testing.factories import trade
from delivery.testing.metrics import counter_value
from delivery.testing.receiver import scripted_subscriber
from delivery.worker.deliverer import MAX_UNRECORDED_HANDBACKS
from delivery.worker.outcomes import AttemptOutcome, OutcomeRecorder
from delivery.worker.retry import Decision, Outcome
from delivery.worker.sender import AttemptResult
from tests.support import run_until_idle

pytestmark = pytest.mark.integration

# -- subscribers, as a list of entries --------------------------------------------------------


@dataclass(frozen=True)
class Subscriber:
    """One subscriber of the hostile set: its path, its answer, the status every attempt
    records, and how its deliveries end."""

    path: str
    answer: Callable[[web.Request], web.Response]
    statuses: frozenset[int]
    ends: str  # "delivered" or "dead"


def _healthy(_request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _gzip(_request: web.Request) -> web.Response:
    # What an nginx with `gzip on; gzip_types *` sends (even unasked, as here).
    body = gzip.compress(b'{"ok": true, "padding": "' + b"x" * 2000 + b'"}')
    return web.Response(body=body, headers={"content-encoding": "gzip"})


def _nul(_request: web.Request) -> web.Response:
    return web.Response(status=500, body=b"broken\x00reply \xff\xfe not utf-8")


def _garbage_retry_after(_request: web.Request) -> web.Response:
    # "²".isdigit() is True, float("²") raises.
    return web.Response(status=503, headers={"retry-after": "²"}, text="later")


def _ten_year_retry_after(_request: web.Request) -> web.Response:
    return web.Response(status=503, headers={"retry-after": str(10 * 365 * 86400)}, text="later")


def _refuses_each_first_attempt() -> Callable[[web.Request], web.Response]:
    """429 + Retry-After: 2 on the first attempt of each event, 200 after: it opened the
    circuit, and every probe was a fresh first attempt refused again (0 of 150 in 240 s)."""
    seen: set[str] = set()

    def answer(request: web.Request) -> web.Response:
        webhook_id = request.headers.get("webhook-id", "")
        if webhook_id in seen:
            return web.Response(text="ok")
        seen.add(webhook_id)
        return web.Response(status=429, headers={"retry-after": "2"}, text="slow down")

    return answer


def _redirect(request: web.Request) -> web.Response:
    location = str(request.url.with_path("/healthy"))
    return web.Response(status=302, headers={"location": location})


HEALTHY = Subscriber("/healthy", _healthy, frozenset({200}), "delivered")


def hostile() -> list[Subscriber]:
    """A fresh hostile set (the 429 subscriber remembers what it refused)."""
    return [
        Subscriber("/gzip", _gzip, frozenset({200}), "delivered"),
        Subscriber("/nul", _nul, frozenset({500}), "dead"),
        Subscriber("/garbage-retry-after", _garbage_retry_after, frozenset({503}), "dead"),
        Subscriber("/ten-year-retry-after", _ten_year_retry_after, frozenset({503}), "dead"),
        Subscriber("/redirect", _redirect, frozenset({302}), "dead"),
        Subscriber(
            "/429-each-first-attempt",
            _refuses_each_first_attempt(),
            frozenset({429, 200}),
            "delivered",
        ),
    ]


@dataclass
class Subscribers:
    """Every POST each path received: (webhook-id, the request's Accept-Encoding)."""

    url: str
    posts: dict[str, list[tuple[str, str | None]]] = field(default_factory=dict)

    def count(self, path: str) -> Counter[str]:
        return Counter(webhook_id for webhook_id, _enc in self.posts.get(path, []))


@contextlib.asynccontextmanager
async def serving(entries: list[Subscriber]) -> AsyncIterator[Subscribers]:
    """The entries' subscribers, each on its path of one local server."""
    by_path = {e.path: e for e in entries}
    holder: list[Subscribers] = []

    async def answer(request: web.Request) -> web.StreamResponse:
        await request.read()
        holder[0].posts.setdefault(request.path, []).append(
            (request.headers.get("webhook-id", ""), request.headers.get("accept-encoding"))
        )
        return by_path[request.path].answer(request)

    async with scripted_subscriber(answer) as url:
        holder.append(Subscribers(url))
        yield holder[0]


def _fast(settings: Settings) -> Settings:
    # The circuit stays out of the way: this is about each delivery's own attempts.
    return settings.model_copy(update={"circuit_failure_threshold": 10_000})


# -- acceptance ------------------------------------------------------------------------------


async def test_hostile_subscribers_beside_a_healthy_one_end_delivered_or_dead_within_the_schedule(
    settings,
):
    settings = _fast(settings)
    max_attempts = len(settings.retry_schedule_s) + 1
    entries = [HEALTHY, *hostile()]
    conn = await asyncpg.connect(settings.database_url)
    async with serving(entries) as subs:
        ids = {}
        for entry in entries:
            sub = await subscriptions.add(conn, url=subs.url + entry.path, patterns="*")
            ids[entry.path] = sub.id
        events = [f"evt_{i:03d}" for i in range(8)]
        await publish_many(conn, [trade(i, id=event_id) for i, event_id in enumerate(events)])

        await run_until_idle(settings, timeout_s=90)

        # The healthy subscriber got each event exactly once (the redirect was not followed).
        assert subs.count(HEALTHY.path) == dict.fromkeys(events, 1)
        for entry in entries:
            posts = subs.count(entry.path)
            assert set(posts) == set(events), entry.path
            assert max(posts.values()) <= max_attempts, (entry.path, posts)
            rows = await conn.fetch(
                "SELECT d.event_id, d.state, d.attempts,"
                " (SELECT count(*) FROM delivery.attempts a WHERE a.delivery_id = d.id) AS recorded"
                " FROM delivery.deliveries d WHERE d.subscription_id = $1",
                ids[entry.path],
            )
            assert {r["state"] for r in rows} == {entry.ends}, entry.path
            # Every reply was understood (none became a "no answer" on the way).
            statuses = await conn.fetch(
                "SELECT DISTINCT a.status FROM delivery.attempts a"
                " JOIN delivery.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = $1",
                ids[entry.path],
            )
            assert {r["status"] for r in statuses} == entry.statuses, entry.path
            # Every POST is a recorded attempt: none was lost to a failed outcome write.
            for row in rows:
                assert row["attempts"] == row["recorded"] == posts[row["event_id"]], entry.path
        # We never invited a compressed reply.
        assert {enc for posted in subs.posts.values() for _id, enc in posted} == {"identity"}
        excerpts = await conn.fetch(
            "SELECT DISTINCT response_excerpt FROM delivery.attempts a"
            " JOIN delivery.deliveries d ON d.id = a.delivery_id WHERE d.subscription_id = $1",
            ids["/nul"],
        )
        assert [r["response_excerpt"] for r in excerpts] == [
            "broken\\x00reply \\xff\\xfe not utf-8"
        ]
    await conn.close()


# -- one test per fix ------------------------------------------------------------------------


async def test_a_reply_that_crashes_the_sender_is_a_failed_attempt_on_the_schedule(settings):
    # A retry step no timestamp can hold (200000000d: its write overflowed) and a stored secret
    # that cannot sign: each once made the attempt crash and the delivery be POSTed again at
    # once, forever. Now each is one recorded attempt.
    settings = _fast(settings)
    conn = await asyncpg.connect(settings.database_url)
    failing = Subscriber("/failing", lambda _r: web.Response(status=500), 500, "pending")
    async with serving([failing]) as subs:
        far = await subscriptions.add(conn, url=subs.url + "/failing", patterns="*")
        await conn.execute(
            "UPDATE delivery.subscriptions SET retry_schedule_s = ARRAY[1.728e13] WHERE id = $1",
            far.id,
        )
        unsignable = await subscriptions.add(conn, url=subs.url + "/unsignable", patterns="*")
        await conn.execute(
            "UPDATE delivery.subscriptions SET secret = 'whsec_not base64!' WHERE id = $1",
            unsignable.id,
        )
        await publish_many(conn, [trade(1, id="evt_far")])

        await run_until_idle(settings, timeout_s=60)

        assert subs.count("/failing") == {"evt_far": 1}
        far_row = await conn.fetchrow(
            "SELECT state, attempts, next_attempt_at > now() + interval '200 days' AS far"
            " FROM delivery.deliveries WHERE subscription_id = $1",
            far.id,
        )
        assert dict(far_row) == {"state": "pending", "attempts": 1, "far": True}
        assert "/unsignable" not in subs.posts  # never sent unsigned
        (dead,) = await dlq.list_dead(conn, subscription_id=unsignable.id)
        assert dead.attempts == 1
        assert dead.reason == "InputError: secret: must be whsec_ followed by base64"
    await conn.close()


async def test_a_delivery_whose_outcome_never_records_goes_to_the_dead_letters_and_spares_its_neighbours(
    settings,
):
    # Given PostgreSQL refuses every outcome of one subscriber's attempts (a trigger here; a
    # value nobody foresaw in life), beside a healthy subscriber and a 410 in the same batches
    settings = _fast(settings)
    entries = [
        HEALTHY,
        Subscriber("/unrecordable", _healthy, 200, "dead"),
        Subscriber("/gone", lambda _r: web.Response(status=410), 410, "dead"),
    ]
    conn = await asyncpg.connect(settings.database_url)
    async with serving(entries) as subs:
        ids = {}
        for entry in entries:
            sub = await subscriptions.add(conn, url=subs.url + entry.path, patterns="*")
            ids[entry.path] = sub.id
        await conn.execute(
            f"""
            CREATE FUNCTION delivery.refuse_outcome() RETURNS trigger LANGUAGE plpgsql AS $fn$
            BEGIN
                IF (SELECT subscription_id FROM delivery.deliveries WHERE id = NEW.delivery_id)
                   = '{ids["/unrecordable"]}' THEN
                    RAISE EXCEPTION 'outcome refused';
                END IF;
                RETURN NEW;
            END $fn$;
            CREATE TRIGGER refuse_outcome BEFORE INSERT ON delivery.attempts
                FOR EACH ROW EXECUTE FUNCTION delivery.refuse_outcome();
            """
        )
        events = [f"evt_{i:03d}" for i in range(20)]
        await publish_many(conn, [trade(i, id=event_id) for i, event_id in enumerate(events)])
        loops_before = counter_value("delivery_attempt_loops_broken_total")

        # A deadline, not a speed: each hand-back waits out the outcome's retries, slow when the
        # machine is loaded.
        await run_until_idle(settings, timeout_s=150)

        # Then each of its deliveries was sent a bounded number of times and is a dead letter
        # with the reason, counted
        assert subs.count("/unrecordable") == dict.fromkeys(events, MAX_UNRECORDED_HANDBACKS)
        dead = await dlq.list_dead(conn, subscription_id=ids["/unrecordable"], limit=100)
        assert len(dead) == len(events)
        assert {d.reason for d in dead} == {
            f"handed back {MAX_UNRECORDED_HANDBACKS} times without a recorded outcome"
            " (last: RaiseError: outcome refused)"
        }
        assert counter_value("delivery_attempt_loops_broken_total") - loops_before == len(events)
        # and its neighbours were recorded once: no duplicate, and the 410 disabled its own
        assert subs.count(HEALTHY.path) == dict.fromkeys(events, 1)
        assert await conn.fetchval(
            "SELECT count(*) FROM delivery.deliveries WHERE subscription_id = $1"
            " AND state = 'delivered' AND attempts = 1",
            ids[HEALTHY.path],
        ) == len(events)
        assert (
            await conn.fetchval(
                "SELECT state FROM delivery.subscriptions WHERE id = $1", ids["/gone"]
            )
            == "disabled"
        )
        assert sum(subs.count("/gone").values()) < len(events) * 2
    await conn.close()


async def test_an_outcome_postgresql_refuses_is_recorded_without_its_text_and_spares_its_batch(
    settings,
):
    # The recorder given what the sender once passed on: a NUL byte in the excerpt
    # (PostgreSQL's text refuses 0x00), in one batch with a success and a 410.
    conn = await asyncpg.connect(settings.database_url)
    sub_ok = await subscriptions.add(conn, url="http://127.0.0.1:9/ok", patterns="*")
    sub_bad = await subscriptions.add(conn, url="http://127.0.0.1:9/bad", patterns="*")
    sub_gone = await subscriptions.add(conn, url="http://127.0.0.1:9/gone", patterns="*")
    rows = {}
    for name, sub in (("warm", sub_ok), ("ok", sub_ok), ("bad", sub_bad), ("gone", sub_gone)):
        rows[name] = (
            await conn.fetchval(
                "INSERT INTO delivery.deliveries (event_id, subscription_id, lease_until)"
                " VALUES ($1, $2, clock_timestamp() + interval '1 minute') RETURNING id",
                f"evt_{name}",
                sub.id,
            ),
            sub.id,
        )
    pool = await create_pool(settings.database_url, min_size=1, max_size=2)
    recorder = OutcomeRecorder(settings, pool)

    def item(name: str, status: int, excerpt: str, decision: Decision) -> AttemptOutcome:
        result = AttemptResult(status=status, error=None, duration_s=0.01, excerpt=excerpt)
        delivery_id, sub_id = rows[name]
        return AttemptOutcome(delivery_id, sub_id, 1, datetime.now(UTC), result, decision)

    degraded_before = counter_value("delivery_outcomes_degraded_total")
    # The first record flushes alone; the three after it wait and then go in one batch.
    results = await asyncio.gather(
        recorder.record(item("warm", 200, "ok", Decision(Outcome.DELIVERED))),
        recorder.record(item("bad", 500, "bro\x00ken", Decision(Outcome.RETRY, delay_s=60.0))),
        recorder.record(item("ok", 200, "ok", Decision(Outcome.DELIVERED))),
        recorder.record(item("gone", 410, "gone", Decision(Outcome.GONE, reason="HTTP 410"))),
        return_exceptions=True,
    )
    assert results == [None, None, None, None]
    states = {
        r["event_id"]: (r["state"], r["attempts"], r["excerpt"], r["error"])
        for r in await conn.fetch(
            "SELECT d.event_id, d.state, d.attempts, a.response_excerpt AS excerpt, a.error"
            " FROM delivery.deliveries d JOIN delivery.attempts a ON a.delivery_id = d.id"
        )
    }
    assert states == {
        "evt_warm": ("delivered", 1, "ok", None),
        "evt_ok": ("delivered", 1, "ok", None),
        "evt_bad": (
            "pending",
            1,
            None,
            "outcome not storable as it was (CharacterNotInRepertoireError)",
        ),
        "evt_gone": ("dead", 1, "gone", None),
    }
    assert counter_value("delivery_outcomes_degraded_total") - degraded_before == 1
    assert (
        await conn.fetchval("SELECT state FROM delivery.subscriptions WHERE id = $1", sub_gone.id)
        == "disabled"
    )
    await pool.close()
    await conn.close()


async def test_dispatch_skips_a_subscription_it_cannot_load_and_delivers_to_the_others(settings):
    # A year-33715 expiry (one rotate-secret with an absurd grace) cannot be a Python datetime:
    # loading every subscription per batch once failed every event.
    settings = _fast(settings)
    entries = [HEALTHY]
    conn = await asyncpg.connect(settings.database_url)
    async with serving(entries) as subs:
        await subscriptions.add(conn, url=subs.url + HEALTHY.path, patterns="*")
        broken = await subscriptions.add(conn, url=subs.url + "/broken", patterns="*")
        await conn.execute(
            "UPDATE delivery.subscriptions SET previous_secret = secret,"
            " previous_secret_expires_at = '33715-01-01' WHERE id = $1",
            broken.id,
        )
        skipped_before = counter_value("delivery_subscriptions_unloadable_total")
        events = [f"evt_{i:03d}" for i in range(5)]
        await publish_many(conn, [trade(i, id=event_id) for i, event_id in enumerate(events)])

        await run_until_idle(settings, timeout_s=60)

        assert subs.count(HEALTHY.path) == dict.fromkeys(events, 1)
        assert "/broken" not in subs.posts
        assert counter_value("delivery_subscriptions_unloadable_total") > skipped_before
    await conn.close()


async def test_the_poison_listing_escapes_bytes_that_are_not_text(settings):
    conn = await asyncpg.connect(settings.database_url)
    await conn.execute(
        "INSERT INTO delivery.poison_messages (message_id, routing_key, reason, body)"
        " VALUES ('m1', 'trade.executed', 'unprocessable: not JSON', $1)",
        b"\xff\xfe\x00binary\x1b[31m",
    )
    (row,) = await dlq.list_poison(conn)
    assert row["body_excerpt"] == "\\xff\\xfe\\x00binary\\x1b[31m"
    assert row["message_id"] == "m1" and row["reason"] == "unprocessable: not JSON"
    await conn.close()
