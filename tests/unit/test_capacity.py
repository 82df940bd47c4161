"""How much of a process one subscriber may hold, how long its leases last, and the capacity
object that reserves and gives back those places (pure: no services)."""

import asyncio

import pytest

from delivery.settings import Settings
from delivery.worker.capacity import Capacity
from delivery.worker.jobs import lease_per_timeout, subscription_hold_cap


def _settings(**knobs: object) -> Settings:
    # model_construct: the defaults and these knobs only, whatever the environment says.
    return Settings.model_construct(**knobs)


def test_defaults_let_a_subscriber_queue_three_rounds_behind_its_request_slots():
    s = _settings()
    assert subscription_hold_cap(s) == 16 + 48
    # Three rounds of queue, its own attempt, and one more for recording the outcome.
    assert lease_per_timeout(s) == 5.0


def test_the_queue_never_takes_a_subscriber_past_a_quarter_of_the_process():
    s = _settings(
        max_in_flight=32, per_subscription_max_in_flight=4, per_subscription_max_queued=48
    )
    assert subscription_hold_cap(s) == 8
    assert lease_per_timeout(s) == 3.0


def test_request_slots_are_always_held_even_past_a_quarter():
    s = _settings(max_in_flight=32, per_subscription_max_in_flight=16)
    assert subscription_hold_cap(s) == 16
    assert lease_per_timeout(s) == 2.0


def test_no_queue_is_the_old_behaviour():
    s = _settings(per_subscription_max_queued=0)
    assert subscription_hold_cap(s) == 16
    assert lease_per_timeout(s) == 2.0


def _capacity(**knobs: object) -> Capacity:
    return Capacity.from_settings(_settings(**knobs))


def test_a_subscriber_holds_up_to_its_cap_and_the_next_reservation_is_refused():
    c = _capacity(
        max_in_flight=100, per_subscription_max_in_flight=2, per_subscription_max_queued=3
    )
    assert c.subscription_cap == 5
    with c.reservations() as held:
        granted = [held.reserve("sub_a") for _ in range(6)]
        assert [r is not None for r in granted] == [True] * 5 + [False]
        assert c.saturated_subscriptions() == ["sub_a"]
        assert c.free_slots_by_subscription() == {"sub_a": 0}
        # Another subscriber is not held back by the full one.
        assert held.reserve("sub_b") is not None
        assert c.free_slots() == 100 - 6
        # A release frees exactly one place, and only one more reservation fits.
        first = granted[0]
        assert first is not None
        held.hand_over(first).release()
        assert c.free_slots_by_subscription()["sub_a"] == 1
        assert held.reserve("sub_a") is not None
        assert held.reserve("sub_a") is None


def test_the_process_holds_at_most_max_in_flight_across_subscribers():
    c = _capacity(max_in_flight=8, per_subscription_max_in_flight=2, per_subscription_max_queued=0)
    with c.reservations() as held:
        granted = [held.reserve(f"sub_{i}") for i in range(4) for _ in range(2)]
        assert all(r is not None for r in granted) and c.free_slots() == 0
        assert held.reserve("sub_new") is None  # the process is full, whoever asks
        last = granted[-1]
        assert last is not None and last.subscription_id == "sub_3"
        held.hand_over(last).release()
        assert c.free_slots() == 1
        assert held.reserve("sub_new") is not None
        assert held.reserve("sub_other") is None


def test_every_reservation_not_handed_over_is_given_back_when_the_block_ends():
    c = _capacity(max_in_flight=100, per_subscription_max_in_flight=2, per_subscription_max_queued=2)
    with c.reservations() as held:
        kept = held.reserve("sub_a")
        held.reserve("sub_a")
        held.reserve("sub_b")
        assert kept is not None
        kept = held.hand_over(kept)
        assert c.held == 3 and not c.idle.is_set()
    # Only the one handed over is still held, by whoever took it.
    assert c.held == 1 and c.free_slots_by_subscription() == {"sub_a": 3}
    kept.release()
    kept.release()  # giving back twice gives back once
    assert c.held == 0 and c.free_slots() == 100 and c.free_slots_by_subscription() == {}
    assert c.idle.is_set()


def test_an_error_in_the_block_gives_its_reservations_back():
    c = _capacity(max_in_flight=10)
    with pytest.raises(RuntimeError), c.reservations() as held:
        held.reserve("sub_a")
        held.reserve("sub_b")
        raise RuntimeError("the commit failed")
    assert c.free_slots() == 10 and c.free_slots_by_subscription() == {}


async def test_a_block_cancelled_while_it_waits_gives_its_reservations_back():
    # A dispatch batch cancelled between reserving and handing its jobs over (the supervisor
    # restarts dispatch when its AMQP connection dies mid-batch) must not leak its slots.
    c = _capacity(max_in_flight=10)
    reserved = asyncio.Event()

    async def batch() -> None:
        with c.reservations() as held:
            for i in range(5):
                held.reserve(f"sub_{i}")
            reserved.set()
            await asyncio.Event().wait()  # the commit that never returns

    task = asyncio.create_task(batch())
    await reserved.wait()
    assert c.free_slots() == 5
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert c.free_slots() == 10 and c.idle.is_set()


def test_the_freed_event_fires_when_either_share_is_given_back():
    c = _capacity(max_in_flight=10, per_subscription_max_in_flight=1)
    with c.reservations() as held:
        reservation = held.reserve("sub_a")
        assert reservation is not None
        reservation = held.hand_over(reservation)
    assert not c.freed.is_set()  # nothing was given back: the one reservation was handed over
    reservation.end_request()  # the POST returned: the subscriber's share comes back
    assert c.freed.is_set() and c.free_slots_by_subscription() == {}
    assert c.free_slots() == 9  # the process share is held until the outcome is committed
    c.freed.clear()
    reservation.release()
    assert c.freed.is_set() and c.free_slots() == 10


async def test_a_subscriber_runs_at_most_its_request_slots_at_once():
    c = _capacity(max_in_flight=100, per_subscription_max_in_flight=2, per_subscription_max_queued=2)
    with c.reservations() as held:
        jobs = [held.reserve("sub_a") for _ in range(3)]
        mine = [held.hand_over(r) for r in jobs if r is not None]
    assert len(mine) == 3
    await mine[0].request_slot()
    await mine[1].request_slot()
    third = asyncio.create_task(mine[2].request_slot())
    await asyncio.sleep(0)  # it runs until it waits for a slot
    assert not third.done()  # both request slots are taken
    mine[0].end_request()
    await asyncio.wait_for(third, 5)
    for reservation in mine:
        reservation.release()
    assert c.free_slots() == 100 and c.free_slots_by_subscription() == {}


def test_a_draining_process_grants_no_reservation():
    c = _capacity(max_in_flight=10)
    c.close()
    assert c.free_slots() == 0
    with c.reservations() as held:
        assert held.reserve("sub_a") is None
