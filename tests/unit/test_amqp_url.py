"""RabbitMQ connection URLs: a short heartbeat and reconnect interval, unless chosen (pure; a
connect to a silent broker is in tests/integration/test_amqp_connect.py)."""

from delivery.broker.connection import with_defaults


def test_heartbeat_and_reconnect_interval_are_added():
    url = with_defaults("amqp://guest:guest@127.0.0.1:5672/")
    assert "heartbeat=10" in url and "reconnect_interval=1" in url


def test_the_operators_choice_wins():
    url = with_defaults("amqp://h/vh?heartbeat=30&reconnect_interval=3")
    assert "heartbeat=30" in url and "reconnect_interval=3" in url
    assert url.count("reconnect_interval") == 1
