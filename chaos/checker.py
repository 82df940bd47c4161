"""The invariant checker: Jepsen's total-queue checker, for webhooks.

Pure: it reads what the producers committed, what the receiver recorded, what the database and
the broker hold after the run settled, and when the faults were, and returns a ``Verdict`` (those
records: ``chaos.records``; how near a fault counts as explained: ``chaos.slack``).

* lost        committed (event, matching subscription) pairs never answered 2xx;
* unexpected  arrivals of ids nobody committed (or at a subscription the event does not match);
* stuck       anything still pending after the settle deadline: outbox rows, undispatched
              events, pending deliveries, messages in the queues, unplanned dead letters;
* duplicates  extra 2xx arrivals of a pair, reported (count, ratio) and each one classified as
              explained (its first arrival falls in or near a fault window) or unexplained;
* inconsistent  arrivals of one webhook-id with different bodies, or a body whose ``id`` is not
              the webhook-id (the contract: the same bytes on every attempt and replay);
* ordering    per-account out-of-order first deliveries, and sequence gaps in the outbox
              (facts, not failures);
* ordered     for ordered subscriptions only, an invariant: per (subscription, account) the
              first 2xx receipts come in strictly increasing sequence with no gap (a sequence
              the scenario skipped with ``delivery dlq skip`` is no gap); duplicates after a
              first success are at-least-once, not a violation;
* redrives    events put back in the relay's path (outbox.redrive_log), by whom, near which
              fault, and whether a fault explains them (``chaos.redrives``: self-healing must
              not hide a loss).

Valid iff lost = unexpected = stuck = inconsistent = bad signatures = unexplained redrives =
ordering violations = ordering gaps = 0.
"""

from __future__ import annotations

import bisect
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence

import orjson

from chaos.context import FaultWindow
from chaos.producer import EventSpec
from chaos.records import SAMPLE, Arrival, SettledState, SubscriptionSpec, Verdict, sample
from chaos.redrives import judge_redrives
from chaos.slack import Slack, explained

__all__ = ["check"]


def check(
    *,
    attempted: dict[str, EventSpec],
    committed_at: dict[str, float],
    arrivals: Sequence[Arrival],
    subscriptions: Sequence[SubscriptionSpec],
    state: SettledState,
    faults: Sequence[FaultWindow],
    slack: Slack | None = None,
    allowed_dead: int = 0,
    redrives_explained: Collection[str] = frozenset(),
    skipped: Mapping[tuple[str, str], int] | None = None,
) -> Verdict:
    """``redrives_explained``: what the scenario's faults can make a redrive (HEALED, SPARE);
    any redrive of another kind is unexplained. ``skipped``: (event id, path) -> sequence of
    the dead letters the scenario itself skipped (``delivery dlq skip``): not expected."""
    skipped = skipped or {}
    v = Verdict(events_attempted=len(attempted))
    # An id the producer never heard back about is still committed if the outbox has it.
    uncertain = set(attempted) - set(committed_at)
    uncertain_committed = {i for i in uncertain if i in state.outbox_ids}
    committed = set(committed_at) | uncertain_committed
    v.events_committed = len(committed)
    v.events_uncertain = len(uncertain)
    v.uncertain_committed = len(uncertain_committed)
    expected = {
        (event_id, s.path)
        for event_id in committed
        for s in subscriptions
        if s.matches(attempted[event_id])
    }
    v.skipped = len(expected & set(skipped))
    expected -= set(skipped)
    v.expected_deliveries = len(expected)

    ok_by_pair = _classify(arrivals, attempted, committed, subscriptions, v)
    lost_pairs = sorted(expected - set(ok_by_pair))
    v.lost = len(lost_pairs)
    v.lost_events = len({e for e, _p in lost_pairs})
    v.lost_sample = [f"{p} {e}" for e, p in lost_pairs[:SAMPLE]]
    v.delivered = len(expected) - v.lost

    _duplicates(ok_by_pair, faults, slack or Slack(), v)
    judge_redrives(state, faults, slack or Slack(), redrives_explained, v)
    _ordering(ok_by_pair, v)
    _ordered_invariant(ok_by_pair, attempted, subscriptions, skipped, v)
    _lag_and_recovery(ok_by_pair, committed_at, faults, v)
    _stuck(state, allowed_dead, {e for e, _p in lost_pairs}, v)
    _judge(state, v)
    return v


def _classify(
    arrivals: Sequence[Arrival],
    attempted: dict[str, EventSpec],
    committed: set[str],
    subscriptions: Sequence[SubscriptionSpec],
    v: Verdict,
) -> dict[tuple[str, str], list[Arrival]]:
    """Count attempts, bad signatures, inconsistent bodies and unexpected arrivals; return
    the 2xx arrivals of expected-looking pairs, by (event id, path)."""
    paths = {s.path: s for s in subscriptions}
    ok_by_pair: dict[tuple[str, str], list[Arrival]] = defaultdict(list)
    bodies: dict[str, bytes] = {}
    for a in arrivals:
        v.attempts_total += 1
        if not a.ok:
            v.attempts_failed += 1
        if a.signature_ok is False:
            v.bad_signatures += 1
        _check_body(a, bodies, v)
        spec = attempted.get(a.webhook_id)
        sub = paths.get(a.path)
        if a.webhook_id not in committed or spec is None:
            v.unexpected += 1
            sample(v.unexpected_sample, f"{a.path} {a.webhook_id}")
        elif sub is None or not sub.matches(spec):
            v.misrouted += 1
            v.unexpected += 1
            sample(v.unexpected_sample, f"misrouted {a.path} {a.webhook_id}")
        elif a.ok:
            ok_by_pair[(a.webhook_id, a.path)].append(a)
    return ok_by_pair


def _stuck(state: SettledState, allowed_dead: int, lost_events: set[str], v: Verdict) -> None:
    """Work left behind. A dead-lettered copy of an event that was delivered anyway (a
    redelivery past x-delivery-limit after an earlier copy was dispatched) is reported, not
    stuck: nothing is waiting on it."""
    poison = state.poison_messages
    if state.poison_by_id is not None:
        delivered = {i: n for i, n in state.poison_by_id.items() if i and i not in lost_events}
        v.poison_of_delivered = sum(delivered.values())
        poison = state.poison_messages - v.poison_of_delivered
    detail = {
        "outbox_unpublished": state.outbox_unpublished,
        "undispatched": state.undispatched,
        "deliveries_pending": state.deliveries_pending,
        "queue_ready": state.queue_ready or 0,
        "dead_queue": state.dead_queue_ready or 0,
        "poison_messages": poison,
        "unplanned_dead_letters": max(0, state.dead_letters - allowed_dead),
    }
    v.stuck_detail = {k: n for k, n in detail.items() if n}
    v.stuck = sum(detail.values())
    v.sequence_gaps = state.sequence_gaps
    v.settle_s = round(state.waited_s, 2)


def _judge(state: SettledState, v: Verdict) -> None:
    if v.lost:
        v.reasons.append(f"lost {v.lost} deliveries ({v.lost_events} events)")
    if v.unexpected:
        v.reasons.append(f"{v.unexpected} unexpected deliveries")
    if v.stuck:
        v.reasons.append(f"stuck: {v.stuck_detail}")
    if not state.settled:
        v.reasons.append(f"did not settle within {state.waited_s:.0f}s")
    if v.inconsistent:
        v.reasons.append(f"{v.inconsistent} arrivals with a different body for one webhook-id")
    if v.bad_signatures:
        v.reasons.append(f"{v.bad_signatures} arrivals with a bad signature")
    if v.ordering_violations or v.ordering_gaps:
        v.reasons.append(
            f"ordered subscriptions: {v.ordering_violations} first receipts out of order, "
            f"{v.ordering_gaps} sequence gaps (e.g. {v.ordering_sample[:3]})"
        )
    if v.redrives_unexplained:
        why = ", ".join(f"{n} {k}" for k, n in v.redrives_unexplained_why.items())
        v.reasons.append(f"{v.redrives_unexplained} unexplained redrives ({why})")
    v.valid = not v.reasons


def _check_body(a: Arrival, bodies: dict[str, bytes], v: Verdict) -> None:
    first = bodies.setdefault(a.webhook_id, a.body)
    consistent = first == a.body
    if consistent and first is a.body:  # first sight: the body must name this webhook-id
        try:
            consistent = orjson.loads(a.body).get("id") == a.webhook_id
        except (orjson.JSONDecodeError, AttributeError):
            consistent = False
    if not consistent:
        v.inconsistent += 1
        sample(v.inconsistent_sample, f"{a.path} {a.webhook_id}")


def _duplicates(
    ok_by_pair: dict[tuple[str, str], list[Arrival]],
    faults: Sequence[FaultWindow],
    slack: Slack,
    v: Verdict,
) -> None:
    delivered_total = 0
    for (event_id, path), got in ok_by_pair.items():
        delivered_total += len(got)
        extra = len(got) - 1
        if extra <= 0:
            continue
        v.duplicates += extra
        first = min(a.at for a in got)
        if not explained(first, faults, slack):
            v.duplicates_unexplained += extra
            sample(
                v.unexplained_sample,
                {"path": path, "id": event_id, "arrivals": sorted(round(a.at, 3) for a in got)},
            )
    v.duplicate_ratio = round(v.duplicates / delivered_total, 6) if delivered_total else 0.0


def _ordering(ok_by_pair: dict[tuple[str, str], list[Arrival]], v: Verdict) -> None:
    """Per subscription and account: first deliveries whose sequence is below one seen before."""
    firsts: dict[tuple[str, str], list[tuple[float, int]]] = defaultdict(list)
    for (_event_id, path), got in ok_by_pair.items():
        a = min(got, key=lambda x: x.at)
        try:
            body = orjson.loads(a.body)
            account, sequence = str(body["account_id"]), int(body["sequence"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        firsts[(path, account)].append((a.at, sequence))
    by_path: dict[str, int] = defaultdict(int)
    for (path, _account), seq in firsts.items():
        highest = 0
        for _at, sequence in sorted(seq):
            if sequence < highest:
                by_path[path] += 1
            highest = max(highest, sequence)
    v.out_of_order_by_path = dict(sorted(by_path.items()))
    v.out_of_order = sum(by_path.values())


def _first_receipts(
    ok_by_pair: dict[tuple[str, str], list[Arrival]], paths: Collection[str]
) -> dict[tuple[str, str], list[tuple[float, int, str]]]:
    """Per (path, account) of the given paths: (time, sequence, event id) of each event's
    first 2xx, in arrival order."""
    firsts: dict[tuple[str, str], list[tuple[float, int, str]]] = defaultdict(list)
    for (event_id, path), got in ok_by_pair.items():
        if path not in paths:
            continue
        a = min(got, key=lambda x: x.at)
        try:
            body = orjson.loads(a.body)
            account, sequence = str(body["account_id"]), int(body["sequence"])
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            continue
        firsts[(path, account)].append((a.at, sequence, event_id))
    for receipts in firsts.values():
        receipts.sort()
    return firsts


def _ordered_invariant(
    ok_by_pair: dict[tuple[str, str], list[Arrival]],
    attempted: dict[str, EventSpec],
    subscriptions: Sequence[SubscriptionSpec],
    skipped: Mapping[tuple[str, str], int],
    v: Verdict,
) -> None:
    """Ordered subscriptions: per account, each first 2xx above every earlier one, and (for a
    subscription of every type, whose account's events are all its own) every sequence from 1
    to the highest first 2xx received or skipped. A gap past the last receipt is a loss, which
    ``lost`` counts already."""
    ordered = {s.path: s for s in subscriptions if s.ordered}
    if not ordered:
        return
    skipped_by: dict[tuple[str, str], set[int]] = defaultdict(set)
    for (event_id, path), sequence in skipped.items():
        spec = attempted.get(event_id)
        if spec is not None:
            skipped_by[(path, spec.account_id)].add(sequence)
    firsts = _first_receipts(ok_by_pair, ordered)
    v.ordered_accounts = len(firsts)
    for (path, account), receipts in sorted(firsts.items()):
        v.ordered_first_receipts += len(receipts)
        highest, highest_id = 0, ""
        for at, sequence, event_id in receipts:
            if sequence <= highest:
                v.ordering_violations += 1
                sample(
                    v.ordering_sample,
                    f"{path} {account}: first 2xx of seq {sequence} ({event_id}) at {at:.3f} "
                    f"after seq {highest} ({highest_id})",
                )
            else:
                highest, highest_id = sequence, event_id
        if ordered[path].patterns != ("*",):
            continue  # other types of the account are not this subscription's: gaps are normal
        seen = {sequence for _at, sequence, _id in receipts} | skipped_by[(path, account)]
        missing = sorted(set(range(1, highest + 1)) - seen)
        v.ordering_gaps += len(missing)
        if missing:
            sample(v.ordering_sample, f"{path} {account}: no first 2xx of seq {missing[:5]}")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[index]


def _lag_and_recovery(
    ok_by_pair: dict[tuple[str, str], list[Arrival]],
    committed_at: dict[str, float],
    faults: Iterable[FaultWindow],
    v: Verdict,
) -> None:
    """Lag: commit -> first 2xx. Recovery after a fault: how long after it was lifted until
    every pair committed before that moment had been delivered; the worst over all faults."""
    pairs: list[tuple[float, float]] = []  # (committed, first 2xx)
    for (event_id, _path), got in ok_by_pair.items():
        commit = committed_at.get(event_id)
        if commit is not None:
            pairs.append((commit, min(a.at for a in got)))
    if not pairs:
        return
    lags = sorted(max(0.0, first - commit) for commit, first in pairs)
    v.lag_max_s = round(lags[-1], 3)
    v.lag_p50_s = round(_percentile(lags, 0.50), 3)
    v.lag_p99_s = round(_percentile(lags, 0.99), 3)
    pairs.sort()
    commits = [c for c, _f in pairs]
    running_max: list[float] = []
    highest = float("-inf")
    for _c, first in pairs:
        highest = max(highest, first)
        running_max.append(highest)
    worst: float | None = None
    for w in faults:
        if w.end is None:
            continue
        n = bisect.bisect_right(commits, w.end)
        if n == 0:
            continue
        recovered = max(0.0, running_max[n - 1] - w.end)
        worst = recovered if worst is None else max(worst, recovered)
    v.recovery_s = None if worst is None else round(worst, 3)
