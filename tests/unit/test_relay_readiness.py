"""The relay's own sense of being stuck: batches with rows and no confirm (pure bookkeeping)."""

from delivery.broker import relay as relay_module
from delivery.broker.relay import Relay
from delivery.ops.health import Health
from delivery.settings import Settings


def _relay(now: list[float], monkeypatch) -> Relay:
    monkeypatch.setattr(relay_module.time, "monotonic", lambda: now[0])
    settings = Settings.model_construct(amqp_prefix="t", publish_timeout_s=10.0)
    return Relay(settings, pool=None, health=Health())  # type: ignore[arg-type]


def test_empty_claims_of_another_loop_do_not_hide_a_stall(monkeypatch):
    now = [1000.0]
    r = _relay(now, monkeypatch)
    r._note_confirms(claimed=50, published=0)
    now[0] += 1
    r._note_confirms(claimed=0, published=0)  # the other loop: the rows are locked by this one
    now[0] += 1
    r._note_confirms(claimed=50, published=0)
    assert r._batches_unconfirmed == 2


def test_a_confirm_ends_the_stall(monkeypatch):
    now = [1000.0]
    r = _relay(now, monkeypatch)
    r._note_confirms(claimed=50, published=0)
    r._note_confirms(claimed=50, published=0)
    r._note_confirms(claimed=50, published=50)
    assert r._batches_unconfirmed == 0


def test_nothing_to_publish_for_a_while_ends_the_stall(monkeypatch):
    now = [1000.0]
    r = _relay(now, monkeypatch)
    r._note_confirms(claimed=50, published=0)
    r._note_confirms(claimed=50, published=0)
    now[0] += 22  # more than twice the publish timeout without a failed batch
    r._note_confirms(claimed=0, published=0)
    assert r._batches_unconfirmed == 0
