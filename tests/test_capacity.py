"""How much of a process one subscriber may hold, and how long its leases last (pure)."""

from delivery.settings import Settings
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
