"""How much of a process one subscriber may hold, and how long its leases last (pure)."""

from delivery.settings import Settings
from delivery.worker.deliverer import Deliverer
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


def _deliverer(**knobs: object) -> Deliverer:
    # Reservations are pure accounting: neither the pool nor the sender is touched.
    return Deliverer(_settings(**knobs), None, None)  # type: ignore[arg-type]


def test_a_subscriber_holds_up_to_its_cap_and_the_next_reservation_is_refused():
    d = _deliverer(
        max_in_flight=100, per_subscription_max_in_flight=2, per_subscription_max_queued=3
    )
    assert d.subscription_cap() == 5
    assert [d.try_reserve("sub_a") for _ in range(6)] == [True] * 5 + [False]
    assert d.saturated_subscriptions() == ["sub_a"]
    assert d.free_slots_by_subscription() == {"sub_a": 0}
    # Another subscriber is not held back by the full one.
    assert d.try_reserve("sub_b")
    assert d.free_slots() == 100 - 6
    # A release frees exactly one place, and only one more reservation fits.
    d.release("sub_a")
    assert d.free_slots_by_subscription()["sub_a"] == 1
    assert d.try_reserve("sub_a")
    assert not d.try_reserve("sub_a")


def test_the_process_holds_at_most_max_in_flight_across_subscribers():
    d = _deliverer(max_in_flight=8, per_subscription_max_in_flight=2, per_subscription_max_queued=0)
    granted = [d.try_reserve(f"sub_{i}") for i in range(4) for _ in range(2)]
    assert granted == [True] * 8 and d.free_slots() == 0
    assert not d.try_reserve("sub_new")  # the process is full, whoever asks
    d.release("sub_2")
    assert d.free_slots() == 1
    assert d.try_reserve("sub_new")
    assert not d.try_reserve("sub_other")
