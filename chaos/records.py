"""What the checker reads and what it returns: the receiver's arrivals, the scenario's
subscriptions (an oracle of its own), the database and the broker once the run settled (with
its redrives), and the ``Verdict``."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any

from chaos.producer import EventSpec

__all__ = ["SAMPLE", "Arrival", "Redrive", "SettledState", "SubscriptionSpec", "Verdict", "sample"]

# How many examples a verdict keeps of each kind of finding.
SAMPLE = 10


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
    # An ordered subscription (``--ordered``): the checker holds its first receipts per
    # account to strictly increasing sequences with no gap.
    ordered: bool = False

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
    # Ordered subscriptions (an invariant, unlike out_of_order): per (path, account), a first
    # 2xx whose sequence is not above every earlier first 2xx is a violation; a sequence below
    # the highest first 2xx that never arrived (and was not skipped) is a gap.
    ordered_accounts: int = 0
    ordered_first_receipts: int = 0
    ordering_violations: int = 0
    ordering_gaps: int = 0
    ordering_sample: list[str] = field(default_factory=list)
    # (event, subscription) pairs the scenario itself skipped (`delivery dlq skip`): never
    # delivered by design, so neither expected nor lost.
    skipped: int = 0
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


def sample(into: list[Any], item: Any) -> None:
    """Keep ``item`` as an example if ``into`` holds fewer than SAMPLE."""
    if len(into) < SAMPLE:
        into.append(item)
