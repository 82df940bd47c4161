"""Settings: loaded once; a bad or missing variable is one line naming it."""

import os

import pytest

from delivery.errors import ConfigError
from delivery.settings import load_settings


@pytest.fixture
def env(monkeypatch):
    for name in [n for n in os.environ if n.startswith("DELIVERY_")]:
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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DELIVERY_DANGEROUS_ACK_BEFORE_COMMIT", "1"),
        ("DELIVERY_DANGEROUS_CRASH_POINT", "after_post"),
    ],
)
def test_test_only_switches_are_refused_without_a_test_harness(env, name, value):
    env.delenv("DELIVERY_TEST_HARNESS", raising=False)
    env.setenv(name, value)
    with pytest.raises(ConfigError, match=f"^{name}: a test-only switch") as info:
        load_settings()
    assert "\n" not in str(info.value)

    env.setenv("DELIVERY_TEST_HARNESS", "true")
    assert load_settings().test_only_switches() == [name]


def test_no_test_only_switch_is_active_by_default(env):
    env.setenv("DELIVERY_TEST_HARNESS", "true")
    assert load_settings().test_only_switches() == []


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


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("DELIVERY_HTTP_TIMEOUT_S", "inf"),
        ("DELIVERY_HTTP_TIMEOUT_S", "nan"),
        ("DELIVERY_HTTP_TIMEOUT_S", "1e9"),
        ("DELIVERY_HTTP_CONNECT_TIMEOUT_S", "-inf"),
        ("DELIVERY_SECRET_ROTATION_GRACE_S", "1e12"),
        ("DELIVERY_SECRET_ROTATION_GRACE_S", "-1"),
        ("DELIVERY_DELIVERY_LEASE_S", "Infinity"),
        ("DELIVERY_CIRCUIT_COOLDOWN_S", "NaN"),
        ("DELIVERY_AUTO_DISABLE_AFTER_S", "1e300"),
        ("DELIVERY_MAX_IN_FLIGHT", "100000000"),
        ("DELIVERY_DISPATCH_BATCH_SIZE", "0"),
        ("DELIVERY_MAX_REDRIVES", "-3"),
        ("DELIVERY_AMQP_DELIVERY_LIMIT", "99999999"),
        ("DELIVERY_RESPONSE_EXCERPT_BYTES", "1000000000"),
        ("DELIVERY_DB_POOL_MAX", "100000"),
        ("DELIVERY_RETRY_SCHEDULE", "5s,200000000d"),
        ("DELIVERY_RETRY_SCHEDULE", ",".join(["1s"] * 51)),
        ("DELIVERY_RETRY_SCHEDULE", "9" * 400 + "s"),
    ],
)
def test_every_number_has_a_finite_range(env, name, value):
    env.setenv(name, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert str(info.value).startswith(f"{name}: ") and "\n" not in str(info.value)


def test_every_numeric_setting_has_an_upper_bound():
    # A new number without one would let `1e12` through again.
    from delivery.settings import Settings

    for name, field in Settings.model_fields.items():
        if field.annotation not in (int, float):
            continue
        bounds = [m for m in field.metadata if hasattr(m, "le") or hasattr(m, "lt")]
        assert bounds, f"{name} has no upper bound"


def test_the_ssrf_guard_is_on_unless_switched_off(env):
    assert load_settings().allow_private_targets is False
    env.setenv("DELIVERY_ALLOW_PRIVATE_TARGETS", "true")
    assert load_settings().allow_private_targets is True
    env.setenv("DELIVERY_ALLOW_PRIVATE_TARGETS", "maybe")
    with pytest.raises(ConfigError, match=r"^DELIVERY_ALLOW_PRIVATE_TARGETS: "):
        load_settings()
