"""The curated mutations: one-line bugs in the core, each a plausible slip, each with the tests
that must catch it.

A mutant is killed when one of its ``kill`` tests fails on a copy of the tree with ``old``
replaced by ``new`` (every ``(old, new)`` pair of ``edits``; each ``old`` occurs exactly once in
its file). ``guarantee`` names the README promise a mutant breaks: those must all be killed.
``equivalent`` says why a mutant cannot be told apart from the real code by any test; those are
listed, not run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    edits: tuple[tuple[str, str], ...]
    what: str
    kill: tuple[str, ...] = ()
    guarantee: str | None = None
    equivalent: str | None = None


ACK_AFTER_COMMIT = "ack only after the commit"
CONFIRMED_ONLY = "the relay marks only confirmed rows published"
RETRY_AFTER = "Retry-After is honoured"
ROTATION = "every valid secret signs during a rotation"
CIRCUIT = "the circuit opens after N consecutive failures and holds deliveries while open"
DRAIN = "SIGTERM drains within the deadline and hands back what it cannot finish"
RECORDED_ONCE = "a success recorded in PostgreSQL is never POSTed again"
DEAD_LETTERS = "failed deliveries end as dead letters with a reason; 410 disables"
REDRIVE = "only events the broker lost are sent again"
POISON = "poison messages are dead-lettered and recorded, never lost or looped"
CLASSIFICATION = "network errors, timeouts, 408, 425, 429 and 5xx are retried; other 4xx are not"
OUTBOX = "an event exists iff its transaction committed, with a gapless per-account sequence"
SIGNATURE = "every POST carries a valid Standard Webhooks signature"
BOUNDS = "concurrency per subscriber and per process is bounded"
PACING = "a 429 holds back and paces its subscription; it never opens the circuit"
RECORDED = "every attempt ends in a recorded outcome; one bad row never fails its neighbours"
TENANTS = "a tenant's events reach only its own subscriptions, and its ids are never another's"
ORDERED = (
    "an ordered subscription's first successful receipts come in sequence per account, and a"
    " dead letter holds its account until replayed or skipped"
)

_MUTANTS: tuple[Mutant, ...] = (
    # -- dispatch ---------------------------------------------------------------------------
    Mutant(
        "dispatch-ack-before-commit",
        "delivery/worker/dispatch.py",
        (
            (
                "        if self._settings.dangerous_ack_before_commit:\n"
                "            for message in accepted:",
                "        if True:\n            for message in accepted:",
            ),
            (
                "        if self._settings.dangerous_ack_before_commit:\n"
                "            return  # acked before the commit",
                "        if True:\n            return  # acked before the commit",
            ),
        ),
        "messages are acked before their batch commits",
        guarantee=ACK_AFTER_COMMIT,
    ),
    Mutant(
        "dispatch-ignores-open-circuit",
        "delivery/worker/dispatch.py",
        (
            (
                "attempt_now = active and not sub.circuit_open",
                "attempt_now = active",
            ),
        ),
        "dispatch attempts a new event at once although the subscription's circuit is open",
        guarantee=CIRCUIT,
    ),
    Mutant(
        "dispatch-disabled-not-dead",
        "delivery/worker/dispatch.py",
        (("pairs.append(_Pair(event, sub, reservation, dead=dead))",
          "pairs.append(_Pair(event, sub, reservation, dead=False))"),),
        "an event for a disabled subscription is kept pending instead of as a dead letter",
        guarantee=DEAD_LETTERS,
    ),
    Mutant(
        "dispatch-commit-failure-not-nacked",
        "delivery/worker/dispatch.py",
        (
            (
                "                for message in messages:\n"
                "                    await _settle(message.nack(requeue=True))",
                "                for message in messages:\n"
                "                    pass",
            ),
        ),
        "a batch whose commit failed for good is neither acked nor nacked: held until the "
        "channel dies",
    ),
    Mutant(
        # Dispatch reserves inside a reservations block, which gives back at its end whatever
        # the deliverer did not take over: the one place a failed commit's capacity comes back.
        "dispatch-commit-failure-keeps-reservations",
        "delivery/worker/capacity.py",
        (
            (
                "        for reservation in held:\n"
                "            reservation.release()",
                "        for reservation in held:\n"
                "            pass",
            ),
        ),
        "a failed commit keeps the deliverer capacity it reserved (a leak per failure)",
        guarantee=BOUNDS,
    ),
    Mutant(
        "dispatch-nacks-on-database-outage",
        "delivery/worker/dispatch.py",
        (("if not (is_connection_error(exc) and not stop.is_set()):", "if True:"),),
        "a database outage nacks the batch (counting toward x-delivery-limit) instead of "
        "holding it",
    ),
    Mutant(
        "dispatch-poison-requeued",
        "delivery/worker/dispatch.py",
        (("await _settle(message.reject(requeue=False))",
          "await _settle(message.reject(requeue=True))"),),
        "an unparseable message is requeued instead of dead-lettered",
        guarantee=POISON,
    ),
    Mutant(
        "dispatch-forged-acked",
        "delivery/worker/dispatch.py",
        (
            (
                '                await self._reject_poison(message, reason, "no_outbox_row")',
                "                await _settle(message.ack())",
            ),
        ),
        "a message naming an event the outbox lacks is acked: dropped without a record",
        guarantee=POISON,
    ),
    Mutant(
        "poison-forged-reason-lost",
        "delivery/worker/poison.py",
        (
            (
                "        if death.cause is not Cause.UNPROCESSABLE:\n"
                "            death = await self._not_ours(message, death)",
                "        if False:\n            death = await self._not_ours(message, death)",
            ),
        ),
        "a message no relay sent is recorded as a broker rejection, not as one the outbox lacks",
        guarantee=POISON,
    ),
    Mutant(
        "dispatch-batch-copies-uncounted",
        "delivery/worker/dispatch.py",
        (("redeliveries = delivery.inbox.redeliveries + 1 + excluded.redeliveries",
          "redeliveries = delivery.inbox.redeliveries + 1"),),
        "copies of an event inside one batch are absorbed without being counted, so the "
        "inbox no longer explains every duplicate (the chaos checker reads it)",
    ),
    # -- relay --------------------------------------------------------------------------------
    Mutant(
        "relay-marks-unconfirmed",
        "delivery/broker/relay.py",
        (("await conn.execute(_MARK, confirmed)",
          "await conn.execute(_MARK, [r['pk'] for r in rows])"),),
        "the relay marks the whole batch published, confirmed or not",
        guarantee=CONFIRMED_ONLY,
    ),
    Mutant(
        "relay-not-mandatory",
        "delivery/broker/relay.py",
        (("exchange.publish(o.message, routing_key=o.routing_key, mandatory=True)",
          "exchange.publish(o.message, routing_key=o.routing_key, mandatory=False)"),),
        "an unroutable message is confirmed and marked published: silently dropped",
        guarantee=CONFIRMED_ONLY,
    ),
    Mutant(
        "relay-no-redeclare",
        "delivery/broker/relay.py",
        (
            (
                "                with contextlib.suppress(Exception):\n"
                "                    async with asyncio.timeout(self._settings.publish_timeout_s):\n"
                "                        await self._declare()\n"
                "                await wait_any(stop, timeout_s=0.5)",
                "                await wait_any(stop, timeout_s=0.5)",
            ),
        ),
        "returned messages (a deleted queue) never make the relay declare the topology again",
    ),
    Mutant(
        "redrive-takes-dispatched",
        "delivery/broker/redrive.py",
        (
            (
                "  AND o.redrives < $1\n"
                "  AND NOT EXISTS (SELECT 1 FROM delivery.inbox i WHERE i.event_id = o.event_id)",
                "  AND o.redrives < $1",
            ),
        ),
        "the redrive sweep re-publishes events that were dispatched already",
        guarantee=REDRIVE,
    ),
    Mutant(
        "redrive-unbounded",
        "delivery/broker/redrive.py",
        (("  AND o.redrives < $1\n", "  AND $1::int >= 0\n"),),
        "the redrive sweep re-publishes the same lost event forever",
        guarantee=REDRIVE,
    ),
    # -- outbox ---------------------------------------------------------------------------------
    Mutant(
        "outbox-sequence-gap",
        # The live publish function is 0016's (0007's is replaced by it).
        "migrations/0016_tenant_keys.sql",
        (("b.last_sequence - c.n + row_number()", "b.last_sequence - c.n + 1 + row_number()"),),
        "sequences start one too high for each batch: a gap per publish",
        guarantee=OUTBOX,
    ),
    Mutant(
        "outbox-duplicate-not-skipped",
        "migrations/0016_tenant_keys.sql",
        (
            (
                "        WHERE NOT EXISTS (SELECT 1 FROM delivery.outbox o "
                "WHERE o.event_id = i.event_id)\n",
                "",
            ),
        ),
        "an id already in the outbox is counted again: its account's counter moves and the "
        "publish fails",
        guarantee=OUTBOX,
    ),
    Mutant(
        "outbox-duplicate-reported-published",
        "delivery/outbox.py",
        (("            if event.id in inserted:\n", "            if True:\n"),),
        "a duplicate id is reported as published, so a producer cannot tell a retry from a "
        "new event",
        guarantee=OUTBOX,
    ),
    # -- tenants ------------------------------------------------------------------------------
    Mutant(
        "dispatch-ignores-tenant",
        "delivery/worker/index.py",
        (
            (
                "        for key in ((tenant_id, account_id), (tenant_id, None)):",
                "        for key in [k for k in self._groups if k[1] in (account_id, None)]:",
            ),
        ),
        "an event is matched to every tenant's subscriptions",
        guarantee=TENANTS,
    ),
    Mutant(
        "outbox-taken-id-is-a-duplicate",
        "migrations/0016_tenant_keys.sql",
        (("        IF taken IS NOT NULL THEN\n", "        IF false THEN\n"),),
        "an id another tenant holds is reported as this tenant's duplicate",
        guarantee=TENANTS,
    ),
    Mutant(
        "subscription-get-ignores-tenant",
        "delivery/store/subscriptions.py",
        (
            (
                'SELECT {_COLUMNS} FROM delivery.subscriptions WHERE id = $1 AND tenant_id = $2",',
                'SELECT {_COLUMNS} FROM delivery.subscriptions WHERE id = $1 OR tenant_id = $2",',
            ),
        ),
        "another tenant's subscription is shown by id",
        guarantee=TENANTS,
    ),
    Mutant(
        "quota-without-lock",
        "delivery/store/subscriptions.py",
        ((" WHERE id = $1 FOR NO KEY UPDATE\",", " WHERE id = $1\","),),
        "two concurrent adds both see room for one more subscription",
    ),
    # -- scheduler ----------------------------------------------------------------------------
    Mutant(
        "scheduler-ignores-retry-time",
        "delivery/worker/scheduler.py",
        (
            (
                "        WHERE subscription_id = subs.id AND state = 'pending'\n"
                "          AND next_attempt_at <= clock_timestamp()\n",
                "        WHERE subscription_id = subs.id AND state = 'pending'\n",
            ),
            (
                "             WHERE subscription_id = subs.id AND state = 'pending' AND attempts > 0\n"
                "               AND next_attempt_at <= clock_timestamp()\n",
                "             WHERE subscription_id = subs.id AND state = 'pending' AND attempts > 0\n",
            ),
        ),
        "a retry is claimed before its time has come",
        guarantee=RETRY_AFTER,
    ),
    Mutant(
        "scheduler-ignores-circuit",
        "delivery/worker/scheduler.py",
        (("if sub.circuit_open and sub.id not in probes:", "if False:"),),
        "every worker probes an open circuit with all its due deliveries",
        guarantee=CIRCUIT,
    ),
    Mutant(
        "scheduler-claims-leased",
        "delivery/worker/scheduler.py",
        (
            (
                "    WHERE d.id IN (SELECT id FROM candidates) AND d.state = 'pending'\n"
                "      AND (d.lease_until IS NULL OR d.lease_until < clock_timestamp())\n",
                "    WHERE d.id IN (SELECT id FROM candidates) AND d.state = 'pending'\n",
            ),
            (
                "          AND (lease_until IS NULL OR lease_until < clock_timestamp())\n"
                "        ORDER BY next_attempt_at",
                "        ORDER BY next_attempt_at",
            ),
            (
                "               AND (lease_until IS NULL OR lease_until < clock_timestamp())\n"
                "             ORDER BY next_attempt_at LIMIT subs.free)",
                "             ORDER BY next_attempt_at LIMIT subs.free)",
            ),
        ),
        "a delivery leased to a worker is claimed again by another",
        guarantee=RECORDED_ONCE,
    ),
    Mutant(
        "scheduler-no-backoff",
        "delivery/worker/scheduler.py",
        (("await wait_any(stop, timeout_s=backoff_s(failures))", "continue"),),
        "a failing claim is retried at once, in a tight loop",
    ),
    Mutant(
        "scheduler-ignores-pause",
        "delivery/worker/scheduler.py",
        (("      AND (s.paced_until IS NULL OR s.paced_until <= clock_timestamp())\n", ""),),
        "a worker claims a paused subscription's deliveries before its Retry-After ends",
        guarantee=PACING,
    ),
    Mutant(
        "scheduler-probes-fresh-first",
        "delivery/worker/scheduler.py",
        (
            ("        ORDER BY retry DESC, next_attempt_at\n", "        ORDER BY next_attempt_at\n"),
            ("    ORDER BY d.attempts = 0, d.next_attempt_at\n", "    ORDER BY d.next_attempt_at\n"),
        ),
        "a probe after a cooldown is a fresh first attempt while a retry is due",
        guarantee=PACING,
    ),
    # -- deliverer ----------------------------------------------------------------------------
    Mutant(
        "deliverer-drops-retry-after",
        "delivery/worker/deliverer.py",
        (("retry_after_s=result.retry_after_s,", "retry_after_s=None,"),),
        "the deliverer ignores the subscriber's Retry-After",
        guarantee=RETRY_AFTER,
    ),
    Mutant(
        "deliverer-ignores-throttle",
        "delivery/worker/deliverer.py",
        (("            self.pacer.throttled(sub.id, sent_s=sent_s, pause_s=decision.pause_s)",
          "            pass"),),
        "a 429 does not pace its subscription in the process (queued work goes into the pause)",
        guarantee=PACING,
    ),
    Mutant(
        "drain-deadline-zero",
        "delivery/worker/deliverer.py",
        (("deadline = self._settings.shutdown_timeout_s", "deadline = 0"),),
        "SIGTERM cancels in-flight attempts at once instead of letting them finish",
        guarantee=DRAIN,
    ),
    Mutant(
        "drain-no-hand-back",
        "delivery/worker/deliverer.py",
        (("await asyncio.shield(self._hand_back(job))", "pass"),),
        "an attempt cancelled at the drain deadline keeps its lease instead of handing it back",
        guarantee=DRAIN,
    ),
    Mutant(
        "drain-queued-not-handed-back",
        "delivery/worker/deliverer.py",
        (
            (
                "                reservation.end_request()\n"
                "                await self._hand_back(job)\n",
                "                reservation.end_request()\n",
            ),
        ),
        "work queued when the drain starts keeps its lease instead of going back",
        guarantee=DRAIN,
    ),
    Mutant(
        "crashed-attempt-not-handed-back",
        "delivery/worker/deliverer.py",
        (
            (
                '            log.exception("delivery_attempt_crashed", delivery_id=job.delivery_id)\n'
                "            await self._hand_back_unrecorded(job, exc)",
                '            log.exception("delivery_attempt_crashed", delivery_id=job.delivery_id)',
            ),
        ),
        "an attempt that crashed (its outcome could not be recorded) keeps its lease",
    ),
    Mutant(
        "unrecorded-loop-unbounded",
        "delivery/worker/deliverer.py",
        (("    state = CASE WHEN unrecorded_handbacks + 1 >= $2 THEN 'dead' ELSE state END,",
          "    state = state,"),),
        "a delivery whose outcome never records is handed back and POSTed again forever",
        guarantee=RECORDED,
    ),
    Mutant(
        "outcomes-no-row-by-row-fallback",
        "delivery/worker/outcomes.py",
        (("if isinstance(exc, Exception) and len(batch) > 1 and not is_connection_error(exc):",
          "if False:"),),
        "one outcome PostgreSQL refuses fails every outcome of its batch",
        guarantee=RECORDED,
    ),
    Mutant(
        "outcome-data-error-not-degraded",
        "delivery/worker/outcomes.py",
        (("        except asyncpg.DataError as exc:\n", "        except ZeroDivisionError as exc:\n"),),
        "an outcome PostgreSQL refuses for its values (a NUL in the excerpt) is never recorded",
        guarantee=RECORDED,
    ),
    Mutant(
        "sender-excerpt-not-escaped",
        "delivery/worker/sender.py",
        (
            (
                "                    excerpt=describe_body(\n"
                "                        excerpt,\n"
                '                        response.headers.get("content-encoding"),\n'
                "                        limit_chars=self._excerpt_bytes,\n"
                "                    ),\n",
                '                    excerpt=excerpt.decode("utf-8", "replace") if excerpt else None,\n',
            ),
        ),
        "a reply with NUL bytes (gzip, binary) is stored as it came, which PostgreSQL refuses",
        guarantee=RECORDED,
    ),
    Mutant(
        "sender-invites-gzip",
        "delivery/worker/sender.py",
        ((', "accept-encoding": "identity"}', "}"),),
        "the sender advertises encodings it never decodes",
    ),
    Mutant(
        "retry-after-unicode-digits",
        "delivery/worker/retry.py",
        (("if value.isascii() and value.isdigit():", "if value.isdigit():"),),
        "a Retry-After of digits float() refuses ('\u00b2') crashes its attempt",
        guarantee=RECORDED,
    ),
    Mutant(
        "dispatch-fails-on-unloadable-subscription",
        "delivery/worker/feed.py",
        (
            (
                "    except Exception as exc:\n"
                "        if is_connection_error(exc):\n"
                "            raise\n"
                "    # One at a time",
                "    except ZeroDivisionError as exc:\n"
                "        if is_connection_error(exc):\n"
                "            raise\n"
                "    # One at a time",
            ),
        ),
        "one subscription row dispatch cannot load fails every batch",
        guarantee=RECORDED,
    ),
    Mutant(
        "capacity-cap-off-by-one",
        "delivery/worker/capacity.py",
        (("if self._per_subscription[subscription_id] >= self.subscription_cap:",
          "if self._per_subscription[subscription_id] > self.subscription_cap:"),),
        "a subscriber may hold one delivery more than its cap",
        guarantee=BOUNDS,
    ),
    Mutant(
        "lease-not-renewed",
        "delivery/worker/deliverer.py",
        (("await self._pool.execute(_RENEW, ids, leases)", "pass"),),
        "held leases are never renewed: a slow outcome commit lets a second worker in",
        guarantee=RECORDED_ONCE,
    ),
    # -- sender -------------------------------------------------------------------------------
    Mutant(
        "sender-drops-retry-after",
        "delivery/worker/sender.py",
        (('retry_after_s=parse_retry_after_s(response.headers.get("retry-after")),',
          "retry_after_s=None,"),),
        "the sender does not read Retry-After",
        guarantee=RETRY_AFTER,
    ),
    Mutant(
        "sender-follows-redirects",
        "delivery/worker/sender.py",
        (("allow_redirects=False", "allow_redirects=True"),),
        "a 3xx is followed (re-POSTing the signed body elsewhere) instead of being the outcome",
    ),
    Mutant(
        "sender-unbounded-excerpt",
        "delivery/worker/sender.py",
        (("await response.content.read(self._excerpt_bytes)", "await response.content.read()"),),
        "the whole reply is read and stored, not an excerpt",
    ),
    Mutant(
        "sender-oserror-escapes",
        "delivery/worker/sender.py",
        (
            (
                "        except OSError as exc:\n"
                '            error = f"{type(exc).__name__}: {exc}"[:500]\n',
                "",
            ),
        ),
        "a refused or reset connection that aiohttp does not wrap escapes the sender",
        equivalent="aiohttp wraps every connect and read failure in ClientError: refused and "
        "DNS failures are ClientConnectorError, resets ClientOSError, a close without a reply "
        "ServerDisconnectedError, a cut mid-body ClientPayloadError, a garbage status line "
        "ClientResponseError (each tried in tests/integration/test_fault_paths.py), so no "
        "refused, reset or closed connection reaches this branch: it is defence in depth "
        "(and without it the sender's last except, for any Exception, records it the same way)",
    ),
    # -- SSRF guard at connect time ------------------------------------------------------------
    Mutant(
        "ssrf-resolver-unguarded",
        "delivery/worker/sender.py",
        (("resolver=GuardedResolver() if self._guarded else None,", "resolver=None,"),),
        "a name that resolves to a private address (DNS rebinding) is connected to",
    ),
    Mutant(
        "ssrf-address-unchecked",
        "delivery/worker/sender.py",
        (("if names_an_address(host):  # aiohttp connects to it without resolving it",
          "if False:"),),
        "a subscription URL naming a private address by number is connected to",
    ),
    Mutant(
        "ssrf-blocked-retried",
        "delivery/worker/retry.py",
        (("if status is None and permanent:", "if False:"),),
        "a blocked target is retried on the schedule instead of failing as permanent at once",
    ),
    # -- signing ------------------------------------------------------------------------------
    Mutant(
        "rotation-new-secret-only",
        "delivery/store/subscriptions.py",
        (("secrets_.append(self.previous_secret)", "pass"),),
        "during a rotation's grace only the new secret signs",
        guarantee=ROTATION,
    ),
    Mutant(
        "rotation-grace-never-ends",
        "delivery/store/subscriptions.py",
        (("and self.previous_secret_expires_at > now", "and now is not None"),),
        "the previous secret keeps signing after its grace has ended",
        guarantee=ROTATION,
    ),
    Mutant(
        "sign-content-without-dot",
        "delivery/signing.py",
        (('prefix = f"{msg_id}.{timestamp}.".encode()', 'prefix = f"{msg_id}.{timestamp}".encode()'),),
        "the signed content is not Standard Webhooks' id.timestamp.body",
        guarantee=SIGNATURE,
    ),
    Mutant(
        "sign-joined-by-comma",
        "delivery/signing.py",
        (('return " ".join(parts)', 'return ",".join(parts)'),),
        "several signatures are joined so that a verifier cannot split them",
        guarantee=ROTATION,
    ),
    Mutant(
        "secret-written-plaintext",
        "delivery/store/subscriptions.py",
        (("box.seal(secret or generate(signing)),", "secret or generate(signing),"),),
        "with DELIVERY_SECRETS_KEY set, a new subscription's secret is stored in plaintext",
    ),
    Mutant(
        "matching-ignores-account",
        "delivery/store/subscriptions.py",
        (("if self.account_id is not None and self.account_id != account_id:", "if False:"),),
        "a subscription to one account gets every account's events",
    ),
    # -- retry policy ---------------------------------------------------------------------------
    Mutant(
        "retry-5xx-only-500-503",
        "delivery/worker/retry.py",
        (("if status in RETRYABLE_STATUSES or status >= 500:",
          "if status in RETRYABLE_STATUSES or status in (500, 503):"),),
        "502 and 504 are dead-lettered at once instead of retried",
        guarantee=CLASSIFICATION,
    ),
    Mutant(
        "retry-429-permanent",
        "delivery/worker/retry.py",
        (("RETRYABLE_STATUSES = frozenset({408, 425, 429})",
          "RETRYABLE_STATUSES = frozenset({408, 425})"),),
        "429 is dead-lettered at once instead of retried",
        guarantee=CLASSIFICATION,
    ),
    Mutant(
        "retry-410-permanent",
        "delivery/worker/retry.py",
        (("    if status == 410:\n        return Outcome.GONE\n", ""),),
        "410 is an ordinary permanent failure and never disables the subscription",
        guarantee=DEAD_LETTERS,
    ),
    Mutant(
        "retry-no-jitter",
        "delivery/worker/retry.py",
        (("base * (1.0 + rng.uniform(-policy.jitter_fraction, policy.jitter_fraction))",
          "base"),),
        "retries of deliveries that failed together are not spread",
    ),
    Mutant(
        "retry-after-uncapped",
        "delivery/worker/retry.py",
        (("return min(retry_after_s, policy.longest_step_s)", "return retry_after_s"),),
        "a subscriber's Retry-After can park a delivery for days",
        guarantee=RETRY_AFTER,
    ),
    Mutant(
        "retry-after-ignored-by-policy",
        "delivery/worker/retry.py",
        (("if retry_after_s is not None and retry_after_s > jittered:", "if False:"),),
        "the policy ignores Retry-After",
        guarantee=RETRY_AFTER,
    ),
    Mutant(
        "retry-one-attempt-short",
        "delivery/worker/retry.py",
        (("if attempt > len(policy.schedule_s):", "if attempt >= len(policy.schedule_s):"),),
        "the schedule's last step is never used",
    ),
    # -- outcomes -------------------------------------------------------------------------------
    Mutant(
        "outcome-overwrites-settled-row",
        "delivery/worker/outcomes.py",
        (("    WHERE d.id = v.id AND d.state = 'pending'\n", "    WHERE d.id = v.id\n"),),
        "an outcome is written over a row that is no longer pending (a late duplicate "
        "attempt turns a delivered row back into a retry)",
        guarantee=RECORDED_ONCE,
    ),
    Mutant(
        "throttle-opens-circuit",
        "delivery/worker/outcomes.py",
        (("            if pause_s is None:\n                outcomes.append(item.decision.outcome)",
          "            outcomes.append(item.decision.outcome)\n            if pause_s is None:\n"
          "                pass"),),
        "a 429 counts toward the circuit like a failure",
        guarantee=PACING,
    ),
    Mutant(
        "circuit-opens-late",
        "delivery/worker/outcomes.py",
        (("    circuit_state = CASE WHEN s.consecutive_failures + $5 >= $2 THEN 'open'",
          "    circuit_state = CASE WHEN s.consecutive_failures + $5 > $2 THEN 'open'"),),
        "the circuit opens after N+1 failures instead of N",
        guarantee=CIRCUIT,
    ),
    Mutant(
        "circuit-counts-before-success",
        "delivery/worker/outcomes.py",
        (("                outcomes = outcomes[last + 1 :]\n", ""),),
        "failures from before the last success of a batch count toward the circuit",
        guarantee=CIRCUIT,
    ),
    Mutant(
        "auto-disable-never",
        "delivery/worker/outcomes.py",
        (('                if row["too_long"]:', "                if False:"),),
        "a subscription failing for longer than the limit is never disabled",
        guarantee=DEAD_LETTERS,
    ),
    Mutant(
        "gone-does-not-disable",
        "delivery/worker/outcomes.py",
        (("            if Outcome.GONE in outcomes:", "            if False:"),),
        "410 does not disable the subscription",
        guarantee=DEAD_LETTERS,
    ),
    Mutant(
        "disable-keeps-pending",
        "delivery/worker/outcomes.py",
        (("        await park_pending(conn, subscription_id, reason)\n", ""),),
        "a disabled subscription's waiting deliveries stay pending instead of dead letters",
        guarantee=DEAD_LETTERS,
    ),
    Mutant(
        "flush-failure-reported-as-success",
        "delivery/worker/outcomes.py",
        (("future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(exc))",
          "future.set_result(None)"),),
        "an outcome that could not be committed is reported to the attempt as recorded",
    ),
    # -- poison ---------------------------------------------------------------------------------
    Mutant(
        "poison-lost-on-record-failure",
        "delivery/worker/poison.py",
        (
            (
                '            log.exception("poison_record_failed", message_id=message.message_id)\n'
                "            await message.nack(requeue=True)",
                '            log.exception("poison_record_failed", message_id=message.message_id)\n'
                "            await message.ack()",
            ),
        ),
        "a poison message whose record failed is acked: gone without a trace",
        guarantee=POISON,
    ),
    Mutant(
        "poison-redrive-logged-as-sweep",
        "delivery/broker/redrive.py",
        (('    by="poison", which=', '    by="sweep", which='),),
        "a redrive by the poison recorder is logged as the sweep's, so the chaos checker "
        "blames the wrong healer",
    ),
    Mutant(
        "poison-never-redriven",
        "delivery/worker/poison.py",
        (("if death.cause is Cause.DELIVERY_LIMIT and await self._redrive(message):",
          "if False:"),),
        "healthy events dead-lettered by connection flaps are recorded as poison, never sent",
        guarantee=POISON,
    ),
    Mutant(
        "poison-redrive-unbounded",
        "delivery/worker/poison.py",
        (("self._pool, event_ids, max_redrives=self._settings.max_redrives",
          "self._pool, event_ids, max_redrives=2**31 - 1"),),
        "a message that really crashes workers is redriven forever, never recorded",
        guarantee=POISON,
    ),
    # -- tenants' ingest rate, paused subscriptions, replay of a window ------------------------
    Mutant(
        "quota-never-refuses",
        "delivery/store/quotas.py",
        (
            (
                "    WHERE greatest(r.tat, statement_timestamp()) + (excluded.tat - statement_timestamp())\n"
                "          <= statement_timestamp() + make_interval(secs => $3::float8)\n",
                "",
            ),
        ),
        "a tenant over its ingest rate is let through",
    ),
    Mutant(
        "index-ignores-version",
        "delivery/worker/feed.py",
        (("if self._reload is None and self.version < version:", "if False:"),),
        "dispatch matches an event against subscriptions older than its publish when the "
        "change's notification is late",
    ),
    Mutant(
        "index-keeps-removed",
        "delivery/worker/index.py",
        (("        if sub.state == SubscriptionState.REMOVED:\n", "        if False:\n"),),
        "a removed subscription stays in the index and keeps getting events",
    ),
    Mutant(
        "dispatch-paused-dead",
        "delivery/worker/dispatch.py",
        (("dead = sub.state == SubscriptionState.DISABLED", "dead = not active"),),
        "an event for a paused subscription is parked as a dead letter instead of kept pending",
    ),
    Mutant(
        "scheduler-claims-paused",
        "delivery/worker/scheduler.py",
        (
            ("WHERE s.id <> ALL($2::text[]) AND s.state <> 'paused'", "WHERE s.id <> ALL($2::text[])"),
            ("if sub.state == SubscriptionState.PAUSED:", "if False:"),
        ),
        "a paused subscription's waiting deliveries are claimed (and parked as disabled)",
    ),
    # -- ordered subscriptions ----------------------------------------------------------------
    Mutant(
        "ordered-attempted-at-dispatch",
        "delivery/worker/dispatch.py",
        (("and not paused and not sub.ordered", "and not paused"),),
        "dispatch attempts an ordered subscription's event at once, ahead of its account's head",
        guarantee=ORDERED,
    ),
    Mutant(
        "ordered-dead-letter-does-not-hold",
        "migrations/0022_ordered_subscriptions.sql",
        (
            (
                "IF FOUND AND v_state NOT IN ('delivered', 'skipped') THEN",
                "IF FOUND AND v_state NOT IN ('delivered', 'skipped', 'dead') THEN",
            ),
        ),
        "an ordered account goes on past a dead letter nobody replayed or skipped",
        guarantee=ORDERED,
    ),
    Mutant(
        "ordered-passes-an-undispatched-event",
        "migrations/0022_ordered_subscriptions.sql",
        (("            EXIT WHEN NOT v_dispatched;\n", "            EXIT WHEN false;\n"),),
        "an ordered account's next event goes before an earlier one of its own not dispatched yet",
        guarantee=ORDERED,
    ),
    Mutant(
        "ordered-replay-not-held",
        "delivery/store/replays.py",
        (
            (
                "next_attempt_at = CASE WHEN d.account_id IS NULL THEN clock_timestamp()\n"
                "                               ELSE 'infinity' END,",
                "next_attempt_at = clock_timestamp(),",
            ),
        ),
        "a window replay makes every replayed delivery of an ordered subscription due at once",
        guarantee=ORDERED,
    ),
    Mutant(
        "replay-past-the-window",
        "delivery/store/replays.py",
        (("AND created_at >= $2 AND created_at < $3", "AND created_at >= $2"),),
        "a replay sends events committed after the window too",
    ),
)

# The tests that kill each mutant, fastest first (the run stops at the first failure).
_R = "tests/unit/test_retry_policy.py::"
_S = "tests/unit/test_signing.py::"
_DL = "tests/integration/test_dead_letters.py::"
_TN = "tests/integration/test_tenants.py::"
_F = "tests/integration/test_fault_paths.py::"
_G = "tests/integration/test_guarantees.py::"
_P = "tests/integration/test_pacing.py::"
_D = "tests/integration/test_drain.py::"
_FM = "tests/integration/test_forged_messages.py::"
_H = "tests/integration/test_hostile.py::"
_HOSTILE = _H + "test_hostile_subscribers_beside_a_healthy_one_end_delivered_or_dead_within_the_schedule"
_SSRF = (
    "tests/integration/test_ssrf.py::"
    "test_a_blocked_target_gets_no_request_and_the_attempt_is_permanent"
)
_PAUSED = (
    "tests/integration/test_pausing.py::"
    "test_a_paused_subscription_gets_nothing_until_resumed_then_everything_in_order"
)
_ORDERED_FAILING = (
    "tests/integration/test_ordered.py::"
    "test_a_failing_subscriber_still_sees_each_accounts_events_in_sequence"
)
_ORDERED_HELD = (
    "tests/integration/test_ordered.py::"
    "test_a_dead_letter_holds_its_account_only_until_skipped_or_replayed"
)
KILLS: dict[str, tuple[str, ...]] = {
    "dispatch-forged-acked": (
        _FM + "test_a_message_with_no_outbox_row_is_poison_with_the_reason_and_never_posted",
    ),
    "poison-forged-reason-lost": (
        _FM + "test_a_message_with_no_outbox_row_is_poison_with_the_reason_and_never_posted",
    ),
    "scheduler-ignores-pause": (
        _P + "test_a_pause_recorded_in_postgresql_holds_back_every_worker",
    ),
    "scheduler-probes-fresh-first": (
        _P + "test_a_probe_after_a_circuit_cooldown_is_a_due_retry_not_a_fresh_event",
    ),
    "deliverer-ignores-throttle": (
        _P + "test_a_rate_limited_subscriber_gets_everything_with_bounded_attempts",
    ),
    "throttle-opens-circuit": (
        _P + "test_a_subscriber_refusing_each_first_attempt_gets_every_event_in_two_attempts",
    ),
    "unrecorded-loop-unbounded": (
        _H + "test_a_delivery_whose_outcome_never_records_goes_to_the_dead_letters_and_spares_its_neighbours",
    ),
    "outcomes-no-row-by-row-fallback": (
        _H + "test_an_outcome_postgresql_refuses_is_recorded_without_its_text_and_spares_its_batch",
    ),
    "outcome-data-error-not-degraded": (
        _H + "test_an_outcome_postgresql_refuses_is_recorded_without_its_text_and_spares_its_batch",
    ),
    "sender-excerpt-not-escaped": (_HOSTILE,),
    "sender-invites-gzip": (_HOSTILE,),
    "retry-after-unicode-digits": (
        _R + "test_a_retry_after_of_non_ascii_digits_is_ignored_not_a_crash",
    ),
    "dispatch-fails-on-unloadable-subscription": (
        _H + "test_dispatch_skips_a_subscription_it_cannot_load_and_delivers_to_the_others",
    ),
    "dispatch-batch-copies-uncounted": (
        "tests/integration/test_pipeline.py::test_copies_of_an_event_in_one_batch_count_as_redeliveries",
    ),
    "poison-redrive-logged-as-sweep": (
        "tests/integration/test_failures.py::"
        "test_a_pack_dead_lettered_past_the_delivery_limit_is_redriven_event_by_event",
    ),
    "outbox-duplicate-reported-published": (
        "tests/integration/test_outbox.py::"
        "test_a_duplicate_id_is_reported_and_leaves_the_accounts_counter_alone",
    ),
    "dispatch-ack-before-commit": (
        _G + "test_a_message_is_acked_only_after_its_batch_commits_so_a_crash_in_between_loses_nothing",
    ),
    "relay-marks-unconfirmed": (
        _G + "test_a_returned_publish_is_never_marked_published_and_goes_out_once_routable",
    ),
    "relay-not-mandatory": (
        _G + "test_a_returned_publish_is_never_marked_published_and_goes_out_once_routable",
    ),
    "scheduler-ignores-retry-time": (
        _G + "test_a_retry_after_holds_the_next_attempt_back_at_least_that_long",
    ),
    "sender-drops-retry-after": (
        _G + "test_a_retry_after_holds_the_next_attempt_back_at_least_that_long",
    ),
    "deliverer-drops-retry-after": (
        _G + "test_a_retry_after_holds_the_next_attempt_back_at_least_that_long",
    ),
    "rotation-new-secret-only": (
        _G + "test_during_a_rotation_both_secrets_verify_and_after_its_grace_only_the_new_one",
    ),
    "rotation-grace-never-ends": (
        _G + "test_during_a_rotation_both_secrets_verify_and_after_its_grace_only_the_new_one",
    ),
    "circuit-opens-late": (
        _G + "test_the_circuit_opens_at_exactly_the_threshold_and_a_new_event_waits_for_the_probe",
    ),
    "dispatch-ignores-open-circuit": (
        _G + "test_the_circuit_opens_at_exactly_the_threshold_and_a_new_event_waits_for_the_probe",
    ),
    "scheduler-ignores-circuit": (
        _G + "test_only_one_worker_probes_an_open_circuit_per_cooldown",
    ),
    "drain-deadline-zero": (
        _D + "test_sigterm_lets_the_in_flight_attempt_finish_and_hands_queued_work_back",
    ),
    "drain-queued-not-handed-back": (
        _D + "test_sigterm_lets_the_in_flight_attempt_finish_and_hands_queued_work_back",
    ),
    "drain-no-hand-back": (
        _D + "test_sigterm_past_the_drain_deadline_hands_every_held_delivery_back",
    ),
    "outcome-overwrites-settled-row": (
        _G + "test_a_late_outcome_never_turns_a_recorded_success_back_into_a_retry",
    ),
    "scheduler-claims-leased": (
        _G + "test_a_leased_delivery_is_not_claimed_by_another_worker_until_its_lease_ends",
    ),
    "lease-not-renewed": (
        "tests/integration/test_failures.py::"
        "test_a_lease_is_renewed_while_the_outcome_commit_waits_so_nobody_posts_twice",
    ),
    "sender-follows-redirects": (
        _G + "test_a_redirect_is_the_attempts_outcome_and_is_never_followed",
    ),
    "sender-unbounded-excerpt": (_G + "test_only_an_excerpt_of_a_long_reply_is_stored",),
    "ssrf-resolver-unguarded": (_SSRF + "[localhost]",),
    "ssrf-address-unchecked": (_SSRF + "[127.0.0.1]",),
    "ssrf-blocked-retried": (
        _R + "test_a_blocked_target_is_permanent_at_once_with_its_reason",
        _SSRF + "[localhost]",
    ),
    "dispatch-commit-failure-not-nacked": (
        _F + "test_a_batch_whose_commit_fails_is_nacked_with_its_capacity_given_back",
    ),
    "dispatch-commit-failure-keeps-reservations": (
        "tests/unit/test_capacity.py::test_an_error_in_the_block_gives_its_reservations_back",
        _F + "test_a_batch_whose_commit_fails_is_nacked_with_its_capacity_given_back",
    ),
    "dispatch-nacks-on-database-outage": (
        _F + "test_a_batch_is_held_not_nacked_while_the_database_is_unreachable",
    ),
    "relay-no-redeclare": (
        _F + "test_a_deleted_dispatch_queue_is_declared_again_when_publishes_come_back",
    ),
    "scheduler-no-backoff": (
        _F + "test_a_failing_claim_backs_off_reports_not_ready_and_recovers",
    ),
    "crashed-attempt-not-handed-back": (
        _F + "test_an_attempt_whose_outcome_cannot_be_recorded_is_handed_back_and_sent_again",
    ),
    "flush-failure-reported-as-success": (
        _F + "test_an_outcome_that_cannot_be_committed_is_raised_to_its_attempt",
    ),
    "poison-lost-on-record-failure": (
        _F + "test_a_poison_message_whose_record_fails_is_kept_in_the_dead_queue_until_recorded",
    ),
    "retry-5xx-only-500-503": (_R + "test_classification_follows_the_contract",),
    "retry-429-permanent": (
        _R + "test_a_retryable_status_is_retried_with_a_delay_and_dead_lettered_only_when_exhausted",
    ),
    "retry-410-permanent": (_R + "test_410_is_gone_not_an_ordinary_permanent_failure",),
    "retry-no-jitter": (
        _R + "test_retries_of_many_deliveries_that_failed_together_are_spread",
    ),
    "retry-after-uncapped": (
        _R + "test_retry_after_longer_than_the_longest_step_is_capped_at_that_step",
    ),
    "retry-after-ignored-by-policy": (
        _R + "test_a_429_with_retry_after_waits_as_long_as_the_subscriber_asked",
    ),
    "retry-one-attempt-short": (_R + "test_every_step_of_the_schedule_is_used_before_giving_up",),
    "matching-ignores-account": (
        "tests/unit/test_unit_rules.py::test_a_subscription_to_one_account_gets_only_that_accounts_events",
    ),
    "sign-content-without-dot": (
        _S + "test_a_signed_request_verifies_with_the_standard_webhooks_library",
    ),
    "secret-written-plaintext": (
        "tests/integration/test_secrets.py::"
        "test_with_a_key_the_database_holds_only_ciphertext_and_deliveries_verify",
    ),
    "sign-joined-by-comma": (
        _S + "test_during_a_rotation_each_secret_alone_verifies_with_the_standard_webhooks_library",
    ),
    "capacity-cap-off-by-one": (
        "tests/unit/test_capacity.py::"
        "test_a_subscriber_holds_up_to_its_cap_and_the_next_reservation_is_refused",
        _G + "test_a_hanging_subscriber_holds_no_more_deliveries_than_its_share",
    ),
    "outbox-sequence-gap": (
        "tests/integration/test_outbox.py::test_sequences_run_one_to_n_per_account_over_publishes_and_batches",
    ),
    "outbox-duplicate-not-skipped": (
        "tests/integration/test_outbox.py::"
        "test_a_duplicate_id_is_reported_and_leaves_the_accounts_counter_alone",
    ),
    "circuit-counts-before-success": (
        _DL + "test_only_failures_after_the_last_success_of_a_batch_count_toward_the_circuit",
    ),
    "auto-disable-never": (
        _DL + "test_a_subscription_failing_for_longer_than_the_limit_is_disabled_with_its_backlog",
    ),
    "gone-does-not-disable": (
        _DL + "test_a_410_disables_the_subscription_and_parks_its_waiting_deliveries_as_dead",
    ),
    "disable-keeps-pending": (
        _DL + "test_a_410_disables_the_subscription_and_parks_its_waiting_deliveries_as_dead",
    ),
    "dispatch-disabled-not-dead": (
        _DL + "test_an_event_for_a_disabled_subscription_is_a_dead_letter_at_once",
    ),
    "redrive-takes-dispatched": (
        _DL + "test_the_redrive_sweep_sends_again_only_lost_events_with_redrives_left",
    ),
    "redrive-unbounded": (
        _DL + "test_the_redrive_sweep_sends_again_only_lost_events_with_redrives_left",
    ),
    "dispatch-ignores-tenant": (
        _TN + "test_an_event_reaches_only_its_own_tenants_subscriptions",
    ),
    "outbox-taken-id-is-a-duplicate": (
        _TN + "test_an_id_another_tenant_holds_is_refused_and_nothing_of_the_batch_is_written",
    ),
    "subscription-get-ignores-tenant": (
        _TN + "test_another_tenants_subscription_is_answered_as_a_missing_one",
    ),
    "quota-without-lock": (_TN + "test_the_subscription_quota_holds_under_concurrent_adds",),
    "dispatch-poison-requeued": (
        _DL + "test_an_unparseable_message_is_dead_lettered_at_once_not_requeued",
    ),
    "poison-never-redriven": (
        _DL + "test_an_event_past_the_delivery_limit_with_redrives_left_is_sent_again_not_poison",
    ),
    "poison-redrive-unbounded": (
        _DL + "test_an_event_past_the_delivery_limit_with_no_redrives_left_is_recorded_as_poison",
    ),
    "quota-never-refuses": (
        "tests/integration/test_quotas.py::"
        "test_a_burst_goes_then_the_tenant_waits_and_a_refusal_takes_nothing",
    ),
    "dispatch-paused-dead": (_PAUSED,),
    "index-ignores-version": (
        "tests/integration/test_subscription_index.py::"
        "test_the_index_reaches_the_version_read_with_the_outbox_without_notifications",
    ),
    "index-keeps-removed": (
        "tests/unit/test_subscription_index.py::test_changes_apply_at_once_even_after_a_type_was_looked_up",
        "tests/integration/test_subscription_index.py::"
        "test_a_running_worker_follows_create_edit_disable_pause_and_remove",
    ),
    "scheduler-claims-paused": (_PAUSED,),
    "ordered-attempted-at-dispatch": (_ORDERED_FAILING, _ORDERED_HELD),
    "ordered-dead-letter-does-not-hold": (_ORDERED_HELD,),
    "ordered-replay-not-held": (_ORDERED_FAILING,),
    "ordered-passes-an-undispatched-event": (
        "tests/integration/test_ordered.py::"
        "test_an_event_dispatched_before_the_one_ahead_of_it_waits_for_it",
    ),
    "replay-past-the-window": (
        "tests/integration/test_replays.py::"
        "test_a_window_is_sent_again_with_the_same_ids_and_nothing_outside_it",
    ),
}

MUTANTS: tuple[Mutant, ...] = tuple(replace(m, kill=KILLS.get(m.id, m.kill)) for m in _MUTANTS)
