"""Redrive classification: events put back in the relay's path (outbox.redrive_log), by whom
(the relay's sweep, the poison recorder), near which fault, and whether a fault explains them.

Self-healing must not hide a loss: a redrive whose event's message never reached a worker
("healed") needs a scenario whose faults can lose a confirmed message, and that message's publish
in or near a fault window; a redrive whose event arrived by its own message too ("spare": the
sweep took a message held too long for a lost one) needs a scenario whose faults can hold one.
Any other redrive is unexplained.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Sequence

from chaos.context import FaultWindow
from chaos.records import Redrive, SettledState, Verdict, sample
from chaos.slack import Slack, window_of

__all__ = ["HEALED", "SPARE", "judge_redrives"]

# What a scenario's faults can make a redrive (Scenario.redrives). HEALED: a confirmed message
# was lost (the queue deleted, dead-lettered) and the redrive delivered its event. SPARE: a
# worker held the message longer than the redrive age; the inbox absorbed the copy.
HEALED = "healed"
SPARE = "spare"


def judge_redrives(
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
        windows = [window_of(r.published_at, faults, slack) for r in entries]
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
        sample(
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
