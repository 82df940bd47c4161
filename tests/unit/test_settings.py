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


@pytest.mark.parametrize(
    ("given", "level"), [("INFO", "info"), ("Warning", "warning"), ("debug", "debug")]
)
def test_log_level_and_format_are_case_insensitive(env, given, level):
    env.setenv("DELIVERY_LOG_LEVEL", given)
    env.setenv("DELIVERY_LOG_FORMAT", "JSON")
    settings = load_settings()
    assert (settings.log_level, settings.log_format) == (level, "json")


@pytest.mark.parametrize(
    ("value", "no_color"), [(None, False), ("", False), ("1", True), ("no", True)]
)
def test_no_color_is_on_when_set_and_not_empty(env, value, no_color):
    env.delenv("NO_COLOR", raising=False)
    if value is not None:
        env.setenv("NO_COLOR", value)
    assert load_settings().no_color is no_color
