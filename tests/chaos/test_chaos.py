"""The chaos suite, short: every scenario with a few hundred events on throwaway servers, each
asserting the checker's verdict; plus the checker and the fault proxy on their own.

The long versions run by hand: ``python -m chaos run all --events 10000`` (see chaos/RESULTS.md).
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
import pytest_asyncio

from chaos.alerts import AlertExpectation, Episode, episodes, judge, scale_rules
from chaos.checker import check
from chaos.cluster import Servers
from chaos.context import FaultWindow
from chaos.producer import EventSpec
from chaos.prometheus import ALERT_RULES, find_binary
from chaos.proxy import FaultProxy
from chaos.records import Arrival, Redrive, SettledState, SubscriptionSpec, Verdict
from chaos.redrives import HEALED, SPARE
from chaos.scenarios import SCENARIOS
from chaos.slack import Slack
from delivery.testing.env import IN_CI
from delivery.testing.waits import wait_until

pytestmark = pytest.mark.chaos

SHORT_EVENTS = 300
SHORT_RATE = 100.0
# Scenarios that expect an alert to fire run the rules of those alerts at their
# ``AlertExpectation.short_scale`` (a quarter unless they say otherwise; chaos.alerts): at a
# tenth the lag threshold (4.5 s) was within what a loaded 2-core machine stalls by; alerts
# whose `for:` is 10 or 15 minutes run at a hundredth. Every other rule, and every scenario
# that only expects quiet, runs at the real clock: a stall does not scale down with the rules,
# so a scaled threshold turns it into a false alarm (burst, at a quarter and load 13: one 20 s
# stall, the 11 s threshold crossed), and quiet at the real thresholds is the claim anyway.


# -- the checker, on made-up records --------------------------------------------------------

SUBS = (SubscriptionSpec("/all", ("*",)), SubscriptionSpec("/trades", ("trade.*",)))


def _event(i: int, kind: str = "trade.executed", account: str = "a") -> EventSpec:
    return EventSpec(f"e{i}", kind, account)


def _body(e: EventSpec, sequence: int) -> bytes:
    return orjson.dumps(
        {"id": e.id, "type": e.type, "account_id": e.account_id, "sequence": sequence}
    )


def _state(**kw: object) -> SettledState:
    base: dict[str, object] = {
        "settled": True,
        "waited_s": 0.1,
        "outbox_ids": frozenset(),
        "outbox_unpublished": 0,
        "undispatched": 0,
        "deliveries_pending": 0,
        "dead_letters": 0,
        "dead_reasons": {},
        "queue_ready": 0,
        "dead_queue_ready": 0,
        "poison_messages": 0,
        "sequence_gaps": 0,
    }
    base.update(kw)
    return SettledState(**base)  # type: ignore[arg-type]


def _ok(path: str, e: EventSpec, seq: int, at: float, status: int = 200) -> Arrival:
    return Arrival(path, e.id, _body(e, seq), status, at, True)


def test_checker_valid_when_every_pair_arrives_and_reports_duplicates_in_fault_windows():
    t, b = _event(1), _event(2, "account.created")
    arrivals = [
        _ok("/all", t, 1, 10.0),
        _ok("/trades", t, 1, 10.1),
        _ok("/all", b, 2, 10.2, status=503),
        _ok("/all", b, 2, 10.5),
        _ok("/all", t, 1, 20.0),  # duplicate: first arrival 10.0, inside the fault window
    ]
    v = check(
        attempted={t.id: t, b.id: b},
        committed_at={t.id: 9.9, b.id: 9.9},
        arrivals=arrivals,
        subscriptions=SUBS,
        state=_state(outbox_ids=frozenset({t.id, b.id})),
        faults=[FaultWindow("kill-9", "worker-1", 10.5, 11.0)],
        slack=Slack(before_s=1.0, after_s=1.0),
    )
    assert v.valid, v.reasons
    assert (v.expected_deliveries, v.delivered, v.lost) == (3, 3, 0)
    assert (v.duplicates, v.duplicates_unexplained) == (1, 0)
    assert v.duplicate_ratio == pytest.approx(1 / 4)
    assert (v.attempts_total, v.attempts_failed) == (5, 1)


def test_checker_catches_loss_unexpected_stuck_and_inconsistent_bodies():
    a, b = _event(1), _event(2)
    forged = Arrival("/all", a.id, b'{"id": "e1", "other": 1}', 200, 5.0, True)
    v = check(
        attempted={a.id: a, b.id: b},
        committed_at={a.id: 1.0, b.id: 1.0},
        arrivals=[
            _ok("/all", a, 1, 2.0),
            forged,
            _ok("/trades", a, 1, 2.0),
            _ok("/all", _event(9), 3, 2.0),  # never attempted
        ],
        subscriptions=SUBS,
        state=_state(outbox_unpublished=1, settled=False),
        faults=[],
    )
    assert not v.valid
    assert (v.lost, v.lost_events) == (2, 1)  # e2 at /all and /trades
    assert v.unexpected == 1 and v.inconsistent == 1
    assert v.stuck == 1 and v.stuck_detail == {"outbox_unpublished": 1}
    assert v.duplicates == 1 and v.duplicates_unexplained == 1  # no fault explains it


def test_checker_counts_uncertain_commits_found_in_the_outbox_and_orders_per_account():
    first, second, third = _event(1), _event(2), _event(3)
    v = check(
        attempted={e.id: e for e in (first, second, third)},
        committed_at={first.id: 1.0, second.id: 1.0},  # e3's COMMIT answer never came
        arrivals=[
            _ok("/all", second, 2, 2.0),
            _ok("/all", first, 1, 2.5),  # out of order
            _ok("/trades", first, 1, 2.0),
            _ok("/trades", second, 2, 2.1),
        ],
        subscriptions=SUBS,
        state=_state(outbox_ids=frozenset({first.id, second.id, third.id})),
        faults=[FaultWindow("stall", "pg", 0.5, 1.5)],
    )
    assert v.events_uncertain == 1 and v.uncertain_committed == 1
    assert v.lost == 2  # e3 committed after all: it must be delivered to both
    assert v.out_of_order == 1 and v.out_of_order_by_path == {"/all": 1}
    assert v.lag_max_s == pytest.approx(1.5)
    assert v.recovery_s == pytest.approx(1.0)  # everything committed by 1.5 arrived by 2.5


def test_checker_reports_poison_copies_of_delivered_events_but_counts_the_others_as_stuck():
    a, b = _event(1, "account.created"), _event(2, "account.created")
    v = check(
        attempted={a.id: a, b.id: b},
        committed_at={a.id: 1.0, b.id: 1.0},
        arrivals=[_ok("/all", a, 1, 2.0)],
        subscriptions=SUBS,
        state=_state(poison_messages=3, poison_by_id={a.id: 1, b.id: 1, "": 1}),
        faults=[],
    )
    assert v.poison_of_delivered == 1  # a's copy: a was delivered anyway
    assert v.stuck_detail == {"poison_messages": 2}  # b (lost) and one without an id
    assert v.lost == 1 and not v.valid


def _redriven_check(
    redrives: list[Redrive], redeliveries: dict[str, int], declared: frozenset[str]
) -> Verdict:
    """Three trade events, each delivered once to both subscriptions; ``redrives`` of them,
    judged against one fault window (100-110 s, slack 5 s before and 15 s after)."""
    events = {e.id: e for e in (_event(1), _event(2), _event(3))}
    return check(
        attempted=events,
        committed_at=dict.fromkeys(events, 99.0),
        arrivals=[
            _ok(path, e, i, 120.0 + i)
            for i, e in enumerate(events.values(), 1)
            for path in ("/all", "/trades")
        ],
        subscriptions=SUBS,
        state=_state(
            outbox_ids=frozenset(events), redrives=tuple(redrives), redeliveries=redeliveries
        ),
        faults=[FaultWindow("queue-deleted", "dispatch", 100.0, 110.0)],
        slack=Slack(before_s=5.0, after_s=15.0),
        redrives_explained=declared,
    )


def test_checker_accepts_a_redrive_that_healed_a_loss_from_a_declared_fault_window():
    # e1's message vanished (no copy reached a worker but the redriven one) while the queue
    # was being deleted: the scenario declares that its faults can lose a message.
    v = _redriven_check([Redrive("e1", "sweep", 104.0, 113.0)], {"e1": 0}, frozenset({HEALED}))
    assert v.valid, v.reasons
    assert (v.redrives, v.redriven_events, v.redrives_healed, v.redrives_spare) == (1, 1, 1, 0)
    assert v.redrives_by == {"sweep": 1}
    assert v.redrives_by_fault == {"queue-deleted": 1}
    assert v.redrives_by_window == {"0 queue-deleted dispatch": 1}
    assert v.redrives_unexplained == 0


def test_checker_fails_a_healed_redrive_whose_publish_is_far_from_every_fault():
    # Published 30 s after the fault was over (more than its 15 s slack): nothing explains
    # how its message was lost, even though the redrive delivered it in the end.
    v = _redriven_check(
        [Redrive("e1", "sweep", 104.0, 113.0), Redrive("e2", "poison", 140.0, 150.0)],
        {"e1": 0, "e2": 0},
        frozenset({HEALED, SPARE}),
    )
    assert not v.valid and v.lost == 0 and v.stuck == 0
    assert v.redrives_by == {"poison": 1, "sweep": 1}
    assert v.redrives_by_fault == {"none": 1, "queue-deleted": 1}
    assert v.redrives_unexplained == 1
    assert v.redrives_unexplained_why == {"healed a message lost away from every fault": 1}
    assert [s["id"] for s in v.redrives_unexplained_sample] == ["e2"]
    assert any("1 unexplained redrives" in r for r in v.reasons)


def test_checker_fails_any_redrive_in_a_scenario_whose_faults_declare_none():
    # Inside the fault window, by either redriver, healed or spare: the scenario's faults
    # (say, one worker killed at a time) cannot cause a redrive at all.
    v = _redriven_check(
        [Redrive("e1", "sweep", 101.0, 108.0), Redrive("e2", "poison", 102.0, 109.0)],
        {"e1": 1, "e2": 0},  # e1's own message arrived as well: a spare copy
        frozenset(),
    )
    assert not v.valid and v.lost == 0
    assert (v.redrives, v.redrives_healed, v.redrives_spare, v.redrives_unexplained) == (2, 1, 1, 2)
    assert v.redrives_unexplained_why == {
        "healed, no fault here loses a message": 1,
        "spare, no fault here holds a message": 1,
    }


def test_checker_tells_a_redrive_that_healed_a_loss_from_a_spare_copy():
    # The broken build's case: its faults can hold a message (a stalled database link), so a
    # spare copy is explained; but e2's message never reached a worker, its redrive healed a
    # loss no fault of this scenario can cause. Redriven twice, e3 arrived twice: one healed.
    v = _redriven_check(
        [
            Redrive("e1", "sweep", 101.0, 108.0),
            Redrive("e2", "sweep", 102.0, 108.0),
            Redrive("e3", "sweep", 103.0, 108.0),
            Redrive("e3", "sweep", 108.5, 112.0),
        ],
        {"e1": 1, "e2": 0, "e3": 1},
        frozenset({SPARE}),
    )
    assert not v.valid and v.lost == 0
    assert (v.redrives_healed, v.redrives_spare, v.redrives_unexplained) == (2, 2, 2)
    assert sorted(s["id"] for s in v.redrives_unexplained_sample) == ["e2", "e3"]
    assert v.redrives_unexplained_why == {"healed, no fault here loses a message": 2}
    spare_only = _redriven_check(
        [Redrive("e1", "sweep", 101.0, 108.0)], {"e1": 1}, frozenset({SPARE})
    )
    assert spare_only.valid and spare_only.redrives_spare == 1


# -- the ordered invariant, on made-up records ----------------------------------------------

ORDERED = (SubscriptionSpec("/all", ("*",)), SubscriptionSpec("/ordered", ("*",), ordered=True))


def _ordered_check(
    receipts: list[tuple[int, float, int]], skipped: dict[tuple[str, str], int] | None = None
) -> Verdict:
    """Account "a"'s events 1..4, each delivered once to /all; ``receipts`` at /ordered as
    (sequence, time, status)."""
    events = {n: _event(n) for n in range(1, 5)}
    arrivals = [_ok("/all", e, n, 1.0 + n / 10) for n, e in events.items()]
    arrivals += [_ok("/ordered", events[n], n, at, status) for n, at, status in receipts]
    return check(
        attempted={e.id: e for e in events.values()},
        committed_at={e.id: 0.5 for e in events.values()},
        arrivals=arrivals,
        subscriptions=ORDERED,
        state=_state(outbox_ids=frozenset(e.id for e in events.values())),
        faults=[FaultWindow("kill-9", "worker-1", 1.0, 9.0)],
        skipped=skipped,
    )


def test_ordered_invariant_passes_first_receipts_in_sequence_with_failures_and_duplicates():
    v = _ordered_check(
        [
            (1, 2.0, 503),
            (1, 2.1, 200),
            (2, 2.2, 200),
            (1, 2.3, 200),  # a duplicate of 1 after 2: at-least-once, not a violation
            (3, 2.4, 503),
            (3, 2.5, 200),
            (4, 2.6, 200),
            (3, 2.7, 200),
        ]
    )
    assert v.valid, v.reasons
    assert (v.ordering_violations, v.ordering_gaps, v.lost) == (0, 0, 0)
    assert (v.ordered_accounts, v.ordered_first_receipts, v.duplicates) == (1, 4, 2)


def test_ordered_invariant_fails_a_first_receipt_out_of_order():
    # 3's first success came before 2's: a subscriber rebuilding state applied 3 before 2.
    v = _ordered_check([(1, 2.0, 200), (3, 2.1, 200), (2, 2.2, 200), (4, 2.3, 200)])
    assert not v.valid and v.lost == 0
    assert (v.ordering_violations, v.ordering_gaps) == (1, 0)
    assert v.ordering_sample == ["/ordered a: first 2xx of seq 2 (e2) at 2.200 after seq 3 (e3)"]
    assert any("1 first receipts out of order" in r for r in v.reasons)
    # The unordered subscription's out-of-order first deliveries stay a fact, not a failure.
    unordered = check(
        attempted={e.id: e for e in (_event(1), _event(2))},
        committed_at={"e1": 0.5, "e2": 0.5},
        arrivals=[_ok("/all", _event(2), 2, 1.0), _ok("/all", _event(1), 1, 1.1)],
        subscriptions=ORDERED[:1],
        state=_state(outbox_ids=frozenset({"e1", "e2"})),
        faults=[],
    )
    assert unordered.valid and unordered.out_of_order == 1


def test_ordered_invariant_fails_a_gap_and_accepts_only_the_skipped_one():
    # 2 never succeeded, yet 3 and 4 went out: a gap (and a loss).
    v = _ordered_check([(1, 2.0, 200), (2, 2.1, 400), (3, 2.2, 200), (4, 2.3, 200)])
    assert not v.valid
    assert (v.ordering_violations, v.ordering_gaps, v.lost) == (0, 1, 1)
    assert "/ordered a: no first 2xx of seq [2]" in v.ordering_sample
    # On-call skipped 2's dead letter (`delivery dlq skip`): neither lost nor a gap.
    v = _ordered_check(
        [(1, 2.0, 200), (2, 2.1, 400), (3, 2.2, 200), (4, 2.3, 200)], {("e2", "/ordered"): 2}
    )
    assert v.valid, v.reasons
    assert (v.skipped, v.expected_deliveries, v.ordering_gaps) == (1, 7, 0)


# -- the alert checker, on made-up timelines ------------------------------------------------


def _alerts_series(name: str, state: str, times: list[float]) -> dict[str, object]:
    return {
        "metric": {
            "__name__": "ALERTS",
            "alertname": name,
            "alertstate": state,
            "severity": "critical",
        },
        "values": [[t, "1"] for t in times],
    }


def test_alert_episodes_come_from_the_alerts_series_pending_firing_and_resolved():
    series = [
        _alerts_series("DeliveryLagHigh", "pending", [100.0, 101.0]),
        _alerts_series("DeliveryLagHigh", "firing", [102.0, 103.0, 104.0]),
        # The same alert again later: a second episode, still active at the end (120).
        _alerts_series("DeliveryLagHigh", "pending", [118.0, 119.0, 120.0]),
        _alerts_series("DeliveryTargetDown", "pending", [110.0]),
    ]
    seen = episodes(series, step_s=1.0, end=120.0)
    assert [(e.alert, e.pending_at, e.firing_at, e.resolved_at) for e in seen] == [
        ("DeliveryLagHigh", 100.0, 102.0, 105.0),
        ("DeliveryTargetDown", 110.0, None, 111.0),
        ("DeliveryLagHigh", 118.0, None, None),
    ]
    assert seen[0].labels == {"severity": "critical"}


def test_the_alert_checker_fails_a_missing_late_or_unexpected_alert():
    expect = AlertExpectation(fire={"DeliveryLagHigh": 120.0}, tolerate=frozenset({"Tolerated"}))
    on_time = Episode("DeliveryLagHigh", {}, pending_at=1060.0, firing_at=1090.0)
    tolerated = Episode("Tolerated", {}, pending_at=1100.0, firing_at=1200.0)
    pending_only = Episode("DeliveryTargetDown", {}, pending_at=1010.0, resolved_at=1020.0)
    assert judge([on_time, tolerated, pending_only], expect, anchor=1000.0, scale=1.0) == []
    # The rules lost the alert (or it never fired): the run fails.
    (missing,) = judge([tolerated], expect, anchor=1000.0, scale=1.0)
    assert "DeliveryLagHigh did not fire within 120 s" in missing and "never fired" in missing
    late = Episode("DeliveryLagHigh", {}, pending_at=1100.0, firing_at=1130.0)
    (problem,) = judge([late], expect, anchor=1000.0, scale=1.0)
    assert "fired at +130.0 s" in problem
    # Scaled rules scale the bound too: 30 s after the fault at scale 0.25 is in time.
    quick = Episode("DeliveryLagHigh", {}, pending_at=1020.0, firing_at=1029.0)
    assert judge([quick], expect, anchor=1000.0, scale=0.25) == []
    # Anything else that fired fails the run, whatever the scenario expected.
    stray = Episode("DeliveryCircuitOpen", {"instance": "w1"}, pending_at=1.0, firing_at=2.0)
    (unexpected,) = judge([on_time, stray], expect, anchor=1000.0, scale=1.0)
    assert unexpected == "alert DeliveryCircuitOpen fired unexpectedly (instance=w1)"


def test_scaled_rules_scale_every_for_and_the_lag_threshold_only():
    text = ALERT_RULES.read_text()
    scaled = scale_rules(text, 0.1)
    assert scale_rules(text, 1.0) == text
    assert "max(delivery_lag_seconds) > 4.5" in scaled
    assert "for: 30s" in text and "for: 3000ms" in scaled and "for: 30000ms" in scaled  # 5m
    assert re.findall(r"for: \S+", scaled) and not re.findall(r"for: \d+[smh]\b", scaled)
    # Thresholds other than the lag's are counts and ratios: unchanged.
    assert "max(delivery_outbox_oldest_age_seconds) > 60" in scaled


def test_scaled_rules_can_scale_only_the_expected_alerts():
    text = ALERT_RULES.read_text()
    scaled = scale_rules(text, 0.01, only={"DeliveryTenantOverQuota", "DeliveryLagHigh"})
    rule = scaled.split("- alert: DeliveryTenantOverQuota")[1].split("- alert:")[0]
    assert "for: 9000ms" in rule  # 15m
    assert "max(delivery_lag_seconds) > 0.45" in scaled
    # Every other rule keeps its real clock (quiet is judged at the thresholds that ship).
    other = scaled.split("- alert: DeliveryStreamClientsFallingBehind")[1]
    assert "for: 10m" in other
    assert len(re.findall(r"for: \d+ms", scaled)) == 2
    assert scale_rules(text, 0.01, only=set()) == text


def test_an_expected_alerts_slack_is_added_to_its_bound_unscaled():
    expect = AlertExpectation(fire={"DeliveryTenantOverQuota": 960.0}, slack_s=10.0)
    assert expect.bound_s("DeliveryTenantOverQuota", 0.01) == pytest.approx(19.6)
    fired = Episode("DeliveryTenantOverQuota", {}, pending_at=1001.0, firing_at=1015.0)
    assert judge([fired], expect, anchor=1000.0, scale=0.01) == []
    late = Episode("DeliveryTenantOverQuota", {}, pending_at=1001.0, firing_at=1021.0)
    (problem,) = judge([late], expect, anchor=1000.0, scale=0.01)
    assert "did not fire within 19.6 s" in problem


# -- the fault proxy, on loopback -----------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def echo_proxy() -> AsyncIterator[FaultProxy]:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with FaultProxy("echo", "127.0.0.1", port) as proxy:
        yield proxy
    server.close()


async def _open(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def test_proxy_forwards_and_shapes(echo_proxy: FaultProxy):
    reader, writer = await _open(echo_proxy)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"hello"
    echo_proxy.set_latency(100)
    began = time.monotonic()
    writer.write(b"x")
    await asyncio.wait_for(reader.readexactly(1), 2)
    assert time.monotonic() - began >= 0.19  # 100 ms each way
    echo_proxy.heal()
    echo_proxy.set_bandwidth(50_000)
    began = time.monotonic()
    writer.write(b"y" * 50_000)
    await asyncio.wait_for(reader.readexactly(50_000), 10)
    assert time.monotonic() - began >= 0.8  # ~1 s (the two directions overlap), less bursts
    echo_proxy.heal()
    writer.close()


async def test_proxy_stall_holds_bytes_and_new_connections_until_resumed(echo_proxy: FaultProxy):
    reader, writer = await _open(echo_proxy)
    echo_proxy.stall()
    writer.write(b"held")
    late_reader, late_writer = await _open(echo_proxy)
    late_writer.write(b"late")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    echo_proxy.resume()
    assert await asyncio.wait_for(reader.readexactly(4), 2) == b"held"
    assert await asyncio.wait_for(late_reader.readexactly(4), 2) == b"late"
    writer.close()
    late_writer.close()


async def test_proxy_cut_reset_refuse_accept(echo_proxy: FaultProxy):
    reader, _w = await _open(echo_proxy)
    await asyncio.sleep(0)  # let the proxy register the connection
    await wait_until(lambda: len(echo_proxy.links) == 1, timeout_s=30, what="one link")
    assert echo_proxy.cut() == 1
    assert await asyncio.wait_for(reader.read(10), 2) == b""  # FIN
    reader, _w = await _open(echo_proxy)
    await wait_until(lambda: len(echo_proxy.links) == 1, timeout_s=30, what="one link")
    assert echo_proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), 2)
    await echo_proxy.refuse()
    with pytest.raises(ConnectionRefusedError):
        await _open(echo_proxy)
    await echo_proxy.accept()
    reader, writer = await _open(echo_proxy)
    writer.write(b"again")
    assert await asyncio.wait_for(reader.readexactly(5), 2) == b"again"
    writer.close()


# -- every scenario, short, on one pair of throwaway servers --------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chaos_servers() -> AsyncIterator[Servers]:
    try:
        servers = await Servers.start()
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"chaos servers unavailable under CI: {exc}")
        pytest.skip(f"chaos servers unavailable: {exc}")
    try:
        yield servers
    finally:
        await servers.close()


# Scenarios that catch a platform bug still open: they must fail (strict: once the bug is fixed
# the XPASS fails the suite, and the marker goes).
KNOWN_BUGS: dict[str, str] = {}


def _scenario_params() -> list[object]:
    # Scenarios about an alert's real clock (ordered-blocked: 10 minutes) run by hand only.
    return [
        pytest.param(name, marks=pytest.mark.xfail(reason=KNOWN_BUGS[name], strict=True))
        if name in KNOWN_BUGS
        else name
        for name, scenario in SCENARIOS.items()
        if scenario.in_suite and scenario.rabbit_nodes == 1
    ]


@pytest.mark.integration
@pytest.mark.parametrize("name", _scenario_params())
async def test_scenario_short(name: str, chaos_servers: Servers, tmp_path: Path):
    await _run_short(name, chaos_servers, tmp_path)


# -- the three-node RabbitMQ scenarios, short, on one shared throwaway cluster ----------------


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def chaos_cluster_servers() -> AsyncIterator[Servers]:
    """One PostgreSQL and one three-node RabbitMQ cluster for every cluster scenario (each its
    own database and queue prefix): a cluster takes 40-80 s to form here."""
    try:
        servers = await Servers.start(rabbit_nodes=3)
    except Exception as exc:
        if IN_CI:
            pytest.fail(f"chaos cluster unavailable under CI: {exc}")
        pytest.skip(f"chaos cluster unavailable: {exc}")
    try:
        yield servers
    finally:
        await servers.close()


@pytest.mark.integration
# The first test also forms the cluster (40-80 s), and each holds a node down for the node
# alert's scaled `for:` and boots it again (20-50 s at load 50).
@pytest.mark.timeout(900)
@pytest.mark.parametrize(
    "name", [name for name, s in SCENARIOS.items() if s.rabbit_nodes == 3 and s.in_suite]
)
async def test_cluster_scenario_short(name: str, chaos_cluster_servers: Servers, tmp_path: Path):
    await _run_short(name, chaos_cluster_servers, tmp_path)


async def _run_short(name: str, servers: Servers, tmp_path: Path) -> None:
    from chaos.runner import run_scenario

    scenario = SCENARIOS[name]
    if scenario.alerts is not None and find_binary() is None:
        message = f"{name} checks its alerts: prometheus not found (apt-get install prometheus)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    report = await run_scenario(
        scenario,
        events=SHORT_EVENTS,
        seed=7,
        out_dir=tmp_path,
        rate=SHORT_RATE,
        servers=servers,
        alert_scale=scenario.alerts.short_scale
        if scenario.alerts and scenario.alerts.fire
        else 1.0,
    )
    v = report.verdict
    print(
        f"\n[chaos] {name}: {report.wall_s:.1f}s, faults {report.faults_injected}, lost {v['lost']}, "
        f"dup {v['duplicates']}, unexpected {v['unexpected']}, stuck {v['stuck']}, "
        f"redrives {v['redrives']} {v['redrives_by']} (healed {v['redrives_healed']}, "
        f"spare {v['redrives_spare']}, unexplained {v['redrives_unexplained']})",
        file=sys.stderr,
    )
    assert report.passed, f"{name}: {report.problems} (logs in {report.out_dir})"
    if scenario.expect_valid:
        assert v["valid"] and v["lost"] == 0 and v["unexpected"] == 0 and v["stuck"] == 0
        assert report.faults_injected > 0 or name == "baseline"
    else:
        # The deliberately broken build (ack before commit), with the redrive sweep on: the
        # checker must see the loss, or the redrives that healed it before the judgement.
        assert not v["valid"] and (v["lost"] > 0 or v["redrives_unexplained"] > 0)
    if scenario.alerts is not None:
        # Every expected alert fired in time, nothing else fired (report.passed says so), and
        # the timeline the report shows came from Prometheus.
        fired = {e["alert"] for e in report.alerts["episodes"] if e["firing_at"] is not None}
        assert set(scenario.alerts.fire) <= fired, report.alerts


@pytest.mark.integration
async def test_a_chaos_cluster_migrates_from_delivery_migrations_dir(
    chaos_servers: Servers, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The harness reads DELIVERY_MIGRATIONS_DIR as `delivery migrate` does: a copy of the
    migrations with one more file is what the cluster's database gets."""
    import shutil

    import asyncpg

    from chaos.cluster import Cluster, Layout
    from delivery.bundled import bundled_dir
    from delivery.testing.services import drop_database

    copy = tmp_path / "migrations"
    shutil.copytree(bundled_dir("migrations"), copy)
    (copy / "9999_chaos_marker.sql").write_text("CREATE TABLE delivery.chaos_marker (id int);\n")
    monkeypatch.setenv("DELIVERY_MIGRATIONS_DIR", str(copy))
    cluster = Cluster(
        chaos_servers, tmp_path / "run", "migrations-dir", Layout(relays=0, workers=0)
    )
    (tmp_path / "run").mkdir()
    try:
        await cluster.start()
        conn = await asyncpg.connect(cluster.db_url)
        try:
            applied = await conn.fetchval(
                "SELECT name FROM delivery.schema_migrations WHERE version = 9999"
            )
            assert applied == "chaos_marker"
            assert await conn.fetchval("SELECT to_regclass('delivery.chaos_marker')") is not None
        finally:
            await conn.close()
    finally:
        await cluster.stop()
        if cluster.database:
            await drop_database(chaos_servers.pg.url, cluster.database)
