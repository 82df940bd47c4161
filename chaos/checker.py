"""The invariant checker: Jepsen's total-queue checker, for webhooks.

Pure: it reads what the producers committed, what the receiver recorded, what the database and
the broker hold after the run settled, and when the faults were, and returns a ``Verdict``.

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
* redrives    events put back in the relay's path (outbox.redrive_log), by whom (the relay's
              sweep, the poison recorder), near which fault. Self-healing must not hide a
              loss: a redrive whose event's message never reached a worker ("healed") needs a
              scenario whose faults can lose a confirmed message, and that message's publish in
              or near a fault window; a redrive whose event arrived by its own message too
              ("spare": the sweep took a message held too long for a lost one) needs a scenario
              whose faults can hold one. Any other redrive is unexplained.

Valid iff lost = unexpected = stuck = inconsistent = bad signatures = unexplained redrives = 0.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import orjson

from chaos.context import FaultWindow
from chaos.producer import EventSpec

__all__ = [
    "HEALED",
    "SPARE",
    "Arrival",
    "Redrive",
    "SettledState",
    "Slack",
    "SubscriptionSpec",
    "Verdict",
    "check",
]

_SAMPLE = 10

# What a scenario's faults can make a redrive (Scenario.redrives; see _redrives). HEALED: a
# confirmed message was lost (the queue deleted, dead-lettered) and the redrive delivered its
# event. SPARE: a worker held the message longer than the redrive age; the inbox absorbed the copy.
HEALED = "healed"
SPARE = "spare"


@dataclass(frozen=True, slots=True)
class Arrival:
    path: str
    webhook_id: str
    body: bytes
    status: int
    at: float  # wall clock
    signature_ok: bool | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class SubscriptionSpec:
    """What the scenario subscribed (our own oracle, independent of the platform's matcher)."""

    path: str
    patterns: tuple[str, ...]
    account_id: str | None = None

    def matches(self, event: EventSpec) -> bool:
        if self.account_id is not None and event.account_id != self.account_id:
            return False
        return any(fnmatch.fnmatchcase(event.type, p) for p in self.patterns)


@dataclass(frozen=True, slots=True)
class Redrive:
    """One entry of outbox.redrive_log: ``event_id`` put back in the relay's path by ``by``
    ("sweep": the relay; "poison": the dead-letter recorder; "?": not logged) at ``at``, which
    gave up for lost its publish at ``published_at`` (wall clock; None: not logged)."""

    event_id: str
    by: str
    published_at: float | None
    at: float | None = None


@dataclass(frozen=True)
class SettledState:
    """The database and the broker after the settle wait."""

    settled: bool
    waited_s: float
    outbox_ids: frozenset[str]
    outbox_unpublished: int
    undispatched: int  # outbox events without an inbox row
    deliveries_pending: int
    dead_letters: int
    dead_reasons: dict[str, int]
    queue_ready: int | None
    dead_queue_ready: int | None
    poison_messages: int
    sequence_gaps: int  # accounts whose sequences are not exactly 1..n
    # Rows the poison recorder kept, by message id ("" when it had none); None: not read.
    poison_by_id: dict[str, int] | None = None
    # Every redrive; and the inbox's redeliveries of each redriven event (copies that reached a
    # worker after the first; absent: the event has no inbox row).
    redrives: tuple[Redrive, ...] = ()
    redeliveries: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Slack:
    """How far from a fault window a duplicate's first arrival may be and still be explained:
    an attempt in flight when the fault began (before), a lease or retry that ends after it."""

    before_s: float = 5.0
    after_s: float = 15.0


@dataclass
class Verdict:
    valid: bool = False
    reasons: list[str] = field(default_factory=list)
    events_attempted: int = 0
    events_committed: int = 0
    events_uncertain: int = 0
    uncertain_committed: int = 0
    expected_deliveries: int = 0
    delivered: int = 0
    lost: int = 0
    lost_events: int = 0
    lost_sample: list[str] = field(default_factory=list)
    unexpected: int = 0
    unexpected_sample: list[str] = field(default_factory=list)
    misrouted: int = 0
    stuck: int = 0
    stuck_detail: dict[str, int] = field(default_factory=dict)
    duplicates: int = 0
    duplicate_ratio: float = 0.0
    duplicates_unexplained: int = 0
    unexplained_sample: list[dict[str, Any]] = field(default_factory=list)
    inconsistent: int = 0
    inconsistent_sample: list[str] = field(default_factory=list)
    bad_signatures: int = 0
    attempts_total: int = 0
    attempts_failed: int = 0
    out_of_order: int = 0
    out_of_order_by_path: dict[str, int] = field(default_factory=dict)
    sequence_gaps: int = 0
    poison_of_delivered: int = 0
    redrives: int = 0
    redriven_events: int = 0
    redrives_by: dict[str, int] = field(default_factory=dict)  # sweep / poison
    redrives_healed: int = 0
    redrives_spare: int = 0
    redrives_by_fault: dict[str, int] = field(default_factory=dict)  # kind (or "none") -> n
    redrives_by_window: dict[str, int] = field(default_factory=dict)  # "index kind target" -> n
    redrives_declared: list[str] = field(default_factory=list)
    redrives_unexplained: int = 0
    redrives_unexplained_why: dict[str, int] = field(default_factory=dict)
    redrives_unexplained_sample: list[dict[str, Any]] = field(default_factory=list)
    lag_max_s: float = 0.0
    lag_p50_s: float = 0.0
    lag_p99_s: float = 0.0
    recovery_s: float | None = None
    settle_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
) -> Verdict:
    """``redrives_explained``: what the scenario's faults can make a redrive (HEALED, SPARE);
    any redrive of another kind is unexplained."""
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
    v.expected_deliveries = len(expected)

    ok_by_pair = _classify(arrivals, attempted, committed, subscriptions, v)
    lost_pairs = sorted(expected - set(ok_by_pair))
    v.lost = len(lost_pairs)
    v.lost_events = len({e for e, _p in lost_pairs})
    v.lost_sample = [f"{p} {e}" for e, p in lost_pairs[:_SAMPLE]]
    v.delivered = len(expected) - v.lost

    _duplicates(ok_by_pair, faults, slack or Slack(), v)
    _redrives(state, faults, slack or Slack(), redrives_explained, v)
    _ordering(ok_by_pair, v)
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
            _sample(v.unexpected_sample, f"{a.path} {a.webhook_id}")
        elif sub is None or not sub.matches(spec):
            v.misrouted += 1
            v.unexpected += 1
            _sample(v.unexpected_sample, f"misrouted {a.path} {a.webhook_id}")
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
    if v.redrives_unexplained:
        why = ", ".join(f"{n} {k}" for k, n in v.redrives_unexplained_why.items())
        v.reasons.append(f"{v.redrives_unexplained} unexplained redrives ({why})")
    v.valid = not v.reasons


def _sample(into: list[Any], item: Any) -> None:
    if len(into) < _SAMPLE:
        into.append(item)


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
        _sample(v.inconsistent_sample, f"{a.path} {a.webhook_id}")


def _explained(at: float, faults: Sequence[FaultWindow], slack: Slack) -> bool:
    for w in faults:
        end = w.end if w.end is not None else float("inf")
        if w.start - slack.before_s <= at <= end + slack.after_s:
            return True
    return False


def _window_of(at: float | None, faults: Sequence[FaultWindow], slack: Slack) -> int | None:
    """The index of the fault window ``at`` falls in (the nearest, if it is only near some),
    None when it is outside every window and its slack."""
    best: int | None = None
    best_distance = float("inf")
    for i, w in enumerate(faults):
        end = w.end if w.end is not None else float("inf")
        if at is None or not w.start - slack.before_s <= at <= end + slack.after_s:
            continue
        distance = max(w.start - at, at - end, 0.0)
        if distance < best_distance:
            best, best_distance = i, distance
    return best


def _redrives(
    state: SettledState,
    faults: Sequence[FaultWindow],
    slack: Slack,
    declared: Collection[str],
    v: Verdict,
) -> None:
    """Count the redrives, attribute each to the fault window its undone publish falls in, and
    judge them event by event. An event's published copies are its original message and one
    per redrive; the copies that reached a worker are the first and one per inbox redelivery.
    The missing ones were lost, so that many of its redrives healed a loss (at least: a
    redelivery of a copy after a crash between commit and ack counts as arrived too); the
    rest were spare copies of a message a worker still held."""
    by_event: dict[str, list[Redrive]] = defaultdict(list)
    for r in state.redrives:
        by_event[r.event_id].append(r)
    v.redrives = len(state.redrives)
    v.redriven_events = len(by_event)
    v.redrives_by = dict(sorted(Counter(r.by for r in state.redrives).items()))
    v.redrives_declared = sorted(declared)
    by_fault: Counter[str] = Counter()
    by_window: Counter[str] = Counter()
    why: Counter[str] = Counter()
    for event_id, entries in sorted(by_event.items()):
        arrived_again = state.redeliveries.get(event_id, 0)
        healed = len(entries) - min(len(entries), arrived_again)
        spare = len(entries) - healed
        v.redrives_healed += healed
        v.redrives_spare += spare
        windows = [_window_of(r.published_at, faults, slack) for r in entries]
        for i in windows:
            if i is None:
                by_fault["none"] += 1
            else:
                w = faults[i]
                by_fault[w.kind] += 1
                by_window[f"{i} {w.kind} {w.target}"] += 1
        near = sum(i is not None for i in windows)
        bad: list[str] = []
        if healed and HEALED not in declared:
            bad += ["healed, no fault here loses a message"] * healed
        elif healed > near:
            bad += ["healed a message lost away from every fault"] * (healed - near)
        if spare and SPARE not in declared:
            bad += ["spare, no fault here holds a message"] * spare
        if not bad:
            continue
        v.redrives_unexplained += len(bad)
        why.update(bad)
        _sample(
            v.redrives_unexplained_sample,
            {
                "id": event_id,
                "by": [r.by for r in entries],
                "published_at": [r.published_at for r in entries],
                "redriven_at": [r.at for r in entries],
                "healed": healed,
                "spare": spare,
                "why": sorted(set(bad)),
            },
        )
    v.redrives_by_fault = dict(sorted(by_fault.items()))
    v.redrives_by_window = dict(sorted(by_window.items(), key=lambda kv: int(kv[0].split()[0])))
    v.redrives_unexplained_why = dict(sorted(why.items()))


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
        if not _explained(first, faults, slack):
            v.duplicates_unexplained += extra
            _sample(
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
