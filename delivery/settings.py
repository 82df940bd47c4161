"""The one typed settings object, read from the environment once at start-up.

Nothing below this module reads ``os.environ``: processes load ``Settings`` once and pass it down.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from delivery.durations import check_schedule_s, parse_schedule_s
from delivery.errors import ConfigError
from delivery.secrets import parse_keys

ENV_PREFIX = "DELIVERY_"
DEFAULT_RETRY_SCHEDULE = "5s,5m,30m,2h,5h,10h,10h"
TEST_HARNESS_VARIABLE = "DELIVERY_TEST_HARNESS"
_HOUR_S = 3_600.0
_DAY_S = 86_400.0
# One attempt's longest wait (also the bound of a subscription's own --timeout).
MAX_HTTP_TIMEOUT_S = 300.0


def node_urls(url: str) -> list[str]:
    """The nodes of ``DELIVERY_AMQP_URL`` (comma-separated), each checked: ``ValueError``
    naming the bad one (the settings turn it into one line naming the variable)."""
    urls = [part.strip() for part in url.split(",")]
    for position, node in enumerate(urls, start=1):
        if not node:
            raise ValueError(f"node {position} of the list is empty")
        parts = urlsplit(node)
        if parts.scheme not in ("amqp", "amqps"):
            raise ValueError(f"node {position} ({safe_url(node)}) is not an amqp:// URL")
        try:
            bad_port = parts.port == 0
        except ValueError:  # not a number, or out of range
            bad_port = True
        if bad_port:
            raise ValueError(f"node {position} ({safe_url(node)}) has a bad port")
        if not parts.hostname:
            raise ValueError(f"node {position} ({safe_url(node)}) names no host")
    return urls


def safe_url(url: str) -> str:
    """A URL fit for a log line or an error: no password."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


class Settings(BaseSettings):
    """Every knob with a sane default; each command requires the service URLs it uses."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="ignore",
        frozen=True,
        populate_by_name=True,
        # inf and nan pass ``gt=0`` and then break every interval computed from them.
        allow_inf_nan=False,
    )

    # The contract's variables.
    database_url: str = ""
    amqp_url: str = ""
    admin_port: int = Field(default=9600, ge=0, le=65535)
    # Loopback unless asked: /metrics and /runbooks are for the scraper and on-call, not the
    # internet. The image sets 0.0.0.0, where the container's network is the boundary.
    admin_host: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9_.:-]{1,253}$")
    retry_schedule_s: Annotated[tuple[float, ...], NoDecode] = Field(
        default=parse_schedule_s(DEFAULT_RETRY_SCHEDULE), alias="DELIVERY_RETRY_SCHEDULE"
    )
    shutdown_timeout_s: float = Field(default=30.0, gt=0, le=_HOUR_S)

    # Broker naming: every exchange and queue name starts with this, so tenants or tests can
    # share one vhost without seeing each other.
    amqp_prefix: str = Field(default="delivery", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    # Broker-side redelivery bound for a message our workers cannot process (poison). Set well
    # above expected connection flaps: webhook attempts are counted by the application instead.
    amqp_delivery_limit: int = Field(default=20, ge=1, le=1_000)
    publish_timeout_s: float = Field(default=10.0, gt=0, le=600)

    relay_batch_size: int = Field(default=500, ge=1, le=10_000)
    # Events of one type packed into one AMQP message (1: a message per event). The broker's
    # per-message cost (publish, confirm, ack) is what bounds the relay, not the bytes.
    relay_events_per_message: int = Field(default=50, ge=1, le=1_000)
    # Relay batches in flight at once per relay process.
    relay_concurrency: int = Field(default=2, ge=1, le=16)
    relay_poll_interval_s: float = Field(default=1.0, gt=0, le=300)
    # An event published this long ago that no worker has dispatched, while the dispatch queue
    # is empty, was lost by the broker after its confirm: the relay publishes it again.
    redrive_after_s: float = Field(default=60.0, gt=0, le=_DAY_S)
    max_redrives: int = Field(default=3, ge=0, le=100)
    # How often each relay reads the backlog gauges (outbox pending and oldest age, the lag by
    # stage). The lag alert's 2-minute promise counts 5 s for it; chaos runs that scale the
    # alert rules down scale this with them.
    backlog_gauges_interval_s: float = Field(default=5.0, ge=0.1, le=300)

    worker_prefetch: int = Field(default=256, ge=1, le=65_535)
    dispatch_batch_size: int = Field(default=128, ge=1, le=10_000)
    # Deliveries one process holds at once: waiting for a request slot, posting, or recording.
    max_in_flight: int = Field(default=512, ge=1, le=100_000)
    # Concurrent requests to one subscriber from one process.
    per_subscription_max_in_flight: int = Field(default=16, ge=1, le=10_000)
    # Deliveries of one subscriber a process may hold waiting for one of those request slots,
    # so a fast subscriber's slots are refilled locally instead of by a claim per finished POST.
    # A slow subscriber thus holds at most 16 + 48 of the process's 512 (the same eighth as
    # 16 of 128 before the queue existed), and never more than a quarter of max_in_flight.
    per_subscription_max_queued: int = Field(default=48, ge=0, le=100_000)
    delivery_lease_s: float = Field(default=120.0, gt=0, le=_DAY_S)
    scheduler_poll_interval_s: float = Field(default=1.0, gt=0, le=300)
    # A safety net beside LISTEN/NOTIFY: each worker reloads its subscription index this often.
    subscription_resync_s: float = Field(default=60.0, ge=1, le=_DAY_S)

    # Circuit breaker: after this many consecutive retryable failures a subscription's deliveries
    # wait (without burning attempts) until a single probe succeeds, tried every cooldown.
    circuit_failure_threshold: int = Field(default=5, ge=1, le=10_000)
    circuit_cooldown_s: float = Field(default=30.0, gt=0, le=_DAY_S)
    # A subscription failing without a single success for this long is disabled; its events are
    # kept as dead letters (`subscriptions enable` + `dlq replay` delivers them).
    auto_disable_after_s: float = Field(default=5 * _DAY_S, gt=0, le=365 * _DAY_S)
    # A 429 holds back its whole subscription for its Retry-After, at most this long (and at
    # most the schedule's longest step); 0: a 429 paces the subscription but never holds it.
    throttle_max_pause_s: float = Field(default=300.0, ge=0, le=_DAY_S)

    # The SSRF guard: false refuses subscription targets inside our own network (loopback,
    # private, link-local, metadata...) when they are made and again at connect time.
    allow_private_targets: bool = False

    http_connect_timeout_s: float = Field(default=5.0, gt=0, le=MAX_HTTP_TIMEOUT_S)
    http_timeout_s: float = Field(default=30.0, gt=0, le=MAX_HTTP_TIMEOUT_S)
    response_excerpt_bytes: int = Field(default=1024, ge=0, le=65_536)
    # Grace period during which a rotated-out secret still signs, so subscribers can switch.
    secret_rotation_grace_s: float = Field(default=_DAY_S, ge=0, le=30 * _DAY_S)
    # Fernet keys, comma-separated (1 to 8): the first seals every secret written, each opens.
    # Empty: secrets are written in plaintext (and a sealed one refuses the process its start).
    # SecretStr: never printed in a repr, a traceback or a log line.
    secrets_key: SecretStr = SecretStr("")

    # `delivery api`: where it listens (loopback unless asked, as the admin server), and the
    # largest request body it reads. 4 MiB holds a batch of 1,000 ordinary events with room to
    # spare; a larger body is refused (413) before it is read whole into memory.
    api_host: str = Field(default="127.0.0.1", pattern=r"^[A-Za-z0-9_.:-]{1,253}$")
    api_port: int = Field(default=8080, ge=0, le=65535)
    api_max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    # The live stream (`GET /v1/stream`): a heartbeat frame at least this often (the contract
    # promises 15 s; tests set less), the frames one client may have waiting before it is
    # closed with 4008 (memory per client is bounded by it), and the clients one tenant may
    # hold open on one `delivery api` process.
    stream_heartbeat_s: float = Field(default=15.0, ge=0.05, le=15.0)
    stream_buffer_events: int = Field(default=1_000, ge=1, le=1_000_000)
    stream_max_clients_per_tenant: int = Field(default=100, ge=1, le=100_000)

    db_pool_min: int = Field(default=1, ge=0, le=1_000)
    db_pool_max: int = Field(default=10, ge=1, le=1_000)

    # Test-only switches (DELIVERY_DANGEROUS_*), refused unless DELIVERY_TEST_HARNESS is also
    # true: one variable copied by mistake into production must not break a process.
    # Exit abruptly at a named point of an attempt ("after_post", "after_record"), to prove
    # crash recovery.
    dangerous_crash_point: Literal["", "after_post", "after_record"] = ""
    # Deliberately broken: dispatch acks messages *before* its transaction commits, so a crash
    # in between loses events. Exists to prove the chaos checker catches loss.
    dangerous_ack_before_commit: bool = False
    # Set only by test harnesses (the tests, the chaos and mutation runs): allows the above.
    test_harness: bool = False

    # Where `delivery migrate` finds its SQL files (default: migrations/ beside the package).
    migrations_dir: str = ""

    # OpenTelemetry spans per webhook attempt (needs `pip install 'delivery-webhooks[otel]'`); the
    # exporter reads the SDK's own variables (OTEL_EXPORTER_OTLP_ENDPOINT, OTEL_SERVICE_NAME).
    otel_enabled: bool = False

    log_format: Literal["auto", "json", "console"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # The NO_COLOR convention (no-color.org): set and not empty, the console log has no colours.
    no_color: bool = Field(default=False, validation_alias="NO_COLOR")

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _lower(cls, value: Any) -> Any:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("no_color", mode="before")
    @classmethod
    def _present(cls, value: Any) -> Any:
        return value != "" if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _database_hosts(cls, value: str) -> str:
        # Several hosts without a target would let a process settle on the read-only standby,
        # where every write fails; after a failover, only read-write finds the new primary.
        netloc = urlsplit(value).netloc.rsplit("@", 1)[-1]
        if "," in netloc and not re.search(r"target_session_attrs=(read-write|primary)\b", value):
            raise ValueError(
                "several hosts need target_session_attrs=read-write, or a process may connect"
                " to a standby"
            )
        return value

    @field_validator("amqp_url")
    @classmethod
    def _amqp_nodes(cls, value: str) -> str:
        if value:
            node_urls(value)  # every node of the list, at start-up
        return value

    @field_validator("secrets_key")
    @classmethod
    def _fernet_keys(cls, value: SecretStr) -> SecretStr:
        parse_keys(value.get_secret_value())
        return value

    @field_validator("retry_schedule_s", mode="before")
    @classmethod
    def _parse_schedule(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_schedule_s(value)
        if isinstance(value, list | tuple):
            return check_schedule_s(tuple(float(v) for v in value))
        return value

    @model_validator(mode="after")
    def _test_only_switches_need_a_harness(self) -> Settings:
        if not self.test_harness and (active := self.test_only_switches()):
            raise ValueError(
                f"{active[0]}: a test-only switch, refused unless {TEST_HARNESS_VARIABLE}=true "
                "(set only by test harnesses)"
            )
        return self

    def test_only_switches(self) -> list[str]:
        """The ``DELIVERY_DANGEROUS_*`` variables that are set, by name."""
        return [
            ENV_PREFIX + name.upper()
            for name in type(self).model_fields
            if name.startswith("dangerous_") and getattr(self, name)
        ]


def _variable_name(loc: tuple[int | str, ...]) -> str:
    field = str(loc[0]) if loc else "?"
    if field.startswith(ENV_PREFIX):
        return field
    info = Settings.model_fields.get(field)
    if info is not None and info.alias:
        return info.alias
    return ENV_PREFIX + field.upper()


def variable_names() -> dict[str, str]:
    """Every setting's environment variable, by field name."""
    names = {}
    for field, info in Settings.model_fields.items():
        alias = info.validation_alias if isinstance(info.validation_alias, str) else info.alias
        names[field] = alias or ENV_PREFIX + field.upper()
    return names


def unknown_variables(environ: Mapping[str, str] | None = None) -> list[str]:
    """A warning for each ``DELIVERY_*`` variable that no setting reads: a typo such as
    ``DELIVERY_MAX_INFLIGHT`` is otherwise ignored without a word, and its default used."""
    known = set(variable_names().values())
    warnings = []
    for name in sorted(os.environ if environ is None else environ):
        upper = name.upper()  # pydantic-settings reads variables in any case
        if upper.startswith(ENV_PREFIX) and upper not in known:
            close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"{name} is not a setting and is ignored{hint}")
    return warnings


def load_settings(
    *, require: tuple[str, ...] = ("database_url", "amqp_url"), **overrides: Any
) -> Settings:
    """Read the environment once; a bad or missing variable is one ``ConfigError`` line.

    ``overrides`` are command-line values (``--admin-port``), which win over the environment;
    ``require`` names the settings this command cannot run without.
    """
    clean = {k: v for k, v in overrides.items() if v is not None}
    try:
        settings = Settings(**clean)
    except ValidationError as exc:
        err = exc.errors()[0]
        message = str(err["msg"]).removeprefix("Value error, ")
        if not err["loc"]:  # a rule across fields: its message names the variables
            raise ConfigError(message) from None
        name = _variable_name(err["loc"])
        if err["type"] == "missing":
            raise ConfigError(f"{name} is not set") from None
        raise ConfigError(f"{name}: {message}") from None
    for field in require:
        if not getattr(settings, field):
            raise ConfigError(f"{ENV_PREFIX}{field.upper()} is not set")
    return settings
