"""Settings: loaded once; a bad or missing variable is one line naming it."""

import pytest

from delivery.errors import ConfigError
from delivery.settings import load_settings


@pytest.fixture
def env(monkeypatch):
    for name in (
        "DELIVERY_DATABASE_URL",
        "DELIVERY_AMQP_URL",
        "DELIVERY_RETRY_SCHEDULE",
        "DELIVERY_ADMIN_PORT",
        "DELIVERY_SHUTDOWN_TIMEOUT_S",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DELIVERY_DATABASE_URL", "postgresql://x@127.0.0.1/db")
    monkeypatch.setenv("DELIVERY_AMQP_URL", "amqp://guest:guest@127.0.0.1/")
    return monkeypatch


def test_defaults_are_sane(env):
    settings = load_settings()
    assert settings.retry_schedule_s[0] == 5 and len(settings.retry_schedule_s) == 7
    assert settings.shutdown_timeout_s == 30
    assert settings.admin_port == 9600
    assert settings.admin_host == "127.0.0.1"  # the image alone sets 0.0.0.0


def test_missing_url_names_the_variable(env):
    env.delenv("DELIVERY_AMQP_URL")
    with pytest.raises(ConfigError, match=r"^DELIVERY_AMQP_URL is not set$"):
        load_settings()
    assert load_settings(require=("database_url",)).amqp_url == ""


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        (
            "DELIVERY_RETRY_SCHEDULE",
            "5s,soon",
            "^DELIVERY_RETRY_SCHEDULE: 'soon' is not a duration",
        ),
        ("DELIVERY_ADMIN_PORT", "http", "^DELIVERY_ADMIN_PORT: "),
        ("DELIVERY_ADMIN_PORT", "70000", "^DELIVERY_ADMIN_PORT: "),
        ("DELIVERY_ADMIN_HOST", "", "^DELIVERY_ADMIN_HOST: "),
        ("DELIVERY_ADMIN_HOST", "0.0.0.0/0", "^DELIVERY_ADMIN_HOST: "),
        ("DELIVERY_SHUTDOWN_TIMEOUT_S", "-1", "^DELIVERY_SHUTDOWN_TIMEOUT_S: "),
    ],
)
def test_malformed_values_name_the_variable(env, name, value, message):
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=message) as info:
        load_settings()
    assert "\n" not in str(info.value)


def test_command_line_overrides_win(env):
    env.setenv("DELIVERY_ADMIN_PORT", "9700")
    assert load_settings(admin_port=0).admin_port == 0
    assert load_settings(admin_port=None).admin_port == 9700
