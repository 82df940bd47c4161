"""RabbitMQ connection URLs: a short heartbeat and reconnect interval, unless chosen (pure; a
connect to a silent broker is in tests/integration/test_amqp_connect.py)."""

import pytest

from delivery.broker.connection import _in_turn, with_defaults
from delivery.broker.nodes import has_majority
from delivery.broker.topology import GROUP_SIZE_ARGUMENT, quorum_arguments
from delivery.errors import BrokerNodeLostError, ConfigError
from delivery.settings import load_settings, node_urls, safe_url


def test_heartbeat_and_reconnect_interval_are_added():
    url = with_defaults("amqp://guest:guest@127.0.0.1:5672/")
    assert "heartbeat=10" in url and "reconnect_interval=1" in url


def test_the_operators_choice_wins():
    url = with_defaults("amqp://h/vh?heartbeat=30&reconnect_interval=3")
    assert "heartbeat=30" in url and "reconnect_interval=3" in url
    assert url.count("reconnect_interval") == 1


# -- a cluster's nodes, comma-separated ------------------------------------------------------

THREE = "amqp://u:p@127.0.0.1:5672/v, amqp://u:p@127.0.0.1:5673/v,amqp://u:p@127.0.0.1:5674/v"


def test_a_list_of_nodes_is_split_and_trimmed():
    assert node_urls(THREE) == [
        "amqp://u:p@127.0.0.1:5672/v",
        "amqp://u:p@127.0.0.1:5673/v",
        "amqp://u:p@127.0.0.1:5674/v",
    ]
    assert node_urls("amqp://h/") == ["amqp://h/"]


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("amqp://h/,,amqp://h2/", "node 2 of the list is empty"),
        ("amqp://h/,http://h2/", "node 2 (http://h2/) is not an amqp:// URL"),
        (
            "amqp://h:5672/,amqp://u:secret@h2:99999/",
            "node 2 (amqp://u:***@h2:99999/) has a bad port",
        ),
        ("amqp:///v", "node 1 (amqp:///v) names no host"),
    ],
)
def test_every_node_is_checked_at_start_up_in_one_line_naming_the_variable(url: str, why: str):
    with pytest.raises(ConfigError) as raised:
        load_settings(require=(), amqp_url=url)
    assert str(raised.value) == f"DELIVERY_AMQP_URL: {why}"
    assert "secret" not in str(raised.value)


def test_after_a_loss_the_next_node_is_tried_first():
    urls = node_urls(THREE)
    assert _in_turn(urls, None) == urls
    assert _in_turn(urls, urls[0]) == [urls[1], urls[2], urls[0]]
    assert _in_turn(urls, urls[2]) == urls


def test_passwords_never_reach_a_log_line():
    assert safe_url("amqp://u:p@h:1/v") == "amqp://u:***@h:1/v"
    assert safe_url("amqp://h/") == "amqp://h/"


def test_a_majority_of_the_listed_nodes_is_more_than_half():
    assert has_majority(2, 3) and has_majority(3, 3) and has_majority(1, 1)
    assert not has_majority(1, 3) and not has_majority(1, 2) and not has_majority(2, 4)


def test_the_quorum_group_size_is_three_from_three_nodes_and_never_more_than_the_nodes():
    assert GROUP_SIZE_ARGUMENT not in quorum_arguments(1)
    assert GROUP_SIZE_ARGUMENT not in quorum_arguments(2)
    assert quorum_arguments(3)[GROUP_SIZE_ARGUMENT] == 3
    assert quorum_arguments(5)[GROUP_SIZE_ARGUMENT] == 3


def test_a_multi_host_database_url_must_ask_for_the_primary():
    with pytest.raises(ConfigError) as raised:
        load_settings(require=(), database_url="postgresql://u@h1:5432,h2:5433/db")
    assert str(raised.value).startswith("DELIVERY_DATABASE_URL: several hosts need")
    url = "postgresql://u@h1:5432,h2:5433/db?target_session_attrs=read-write"
    assert load_settings(require=(), database_url=url).database_url == url
    assert load_settings(require=(), database_url="postgresql://u:p,q@h/db").database_url


def test_a_lost_node_restarts_its_component_at_once_and_anything_else_is_a_failure():
    from workers.process import _failing_over

    lost = BrokerNodeLostError("delivery-relay: node amqp://h1/ unreachable; failing over")
    assert _failing_over(lost)
    assert _failing_over(ExceptionGroup("task group", [lost]))
    assert not _failing_over(ExceptionGroup("task group", [lost, ValueError("bug")]))
    assert not _failing_over(ValueError("bug"))
