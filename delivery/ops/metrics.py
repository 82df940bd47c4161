"""Every Prometheus metric the platform exports, in one place. Labels stay low-cardinality:
outcomes, states and component names; never event ids, subscription ids or URLs."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, Info

from delivery.version import VERSION

_LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    300,
    1800,
    3600,
    21600,
)

# The contract's metrics.
OUTBOX_PENDING = Gauge("delivery_outbox_pending", "Outbox rows not yet published to RabbitMQ")
OUTBOX_OLDEST_AGE = Gauge(
    "delivery_outbox_oldest_age_seconds", "Age of the oldest unpublished outbox row"
)
EVENTS_PUBLISHED = Counter(
    "delivery_events_published_total", "Events published to RabbitMQ and confirmed by the relay"
)
ATTEMPTS = Counter("delivery_attempts_total", "Webhook attempts by outcome", ["outcome"])
ATTEMPT_DURATION = Histogram(
    "delivery_attempt_duration_seconds",
    "Duration of one webhook HTTP attempt",
    buckets=_LATENCY_BUCKETS_S,
)
END_TO_END = Histogram(
    "delivery_end_to_end_seconds",
    "From outbox commit to the subscriber's 2xx",
    buckets=_LATENCY_BUCKETS_S,
)
IN_FLIGHT = Gauge("delivery_in_flight", "Webhook deliveries being attempted now")
DEAD_LETTERS = Counter(
    "delivery_dead_letters_total", "Deliveries moved to the dead letters", ["reason"]
)
SUBSCRIPTIONS = Gauge("delivery_subscriptions", "Subscriptions by state", ["state"])

# Ours.
RELAY_BATCH_SIZE = Histogram(
    "delivery_relay_batch_size",
    "Rows claimed per relay batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
RELAY_PUBLISH_SECONDS = Histogram(
    "delivery_relay_publish_seconds",
    "Time to publish and confirm one relay batch",
    buckets=_LATENCY_BUCKETS_S,
)
RELAY_PUBLISH_FAILURES = Counter(
    "delivery_relay_publish_failures_total",
    "Outbox rows whose publish was not confirmed",
    ["reason"],
)
EVENTS_REDRIVEN = Counter(
    "delivery_events_redriven_total",
    "Published events the broker lost (no worker dispatched them) put back in the outbox",
)
EVENTS_DISPATCHED = Counter(
    "delivery_events_dispatched_total", "Events fanned out to deliveries by workers"
)
DUPLICATES_ABSORBED = Counter(
    "delivery_duplicates_absorbed_total",
    "Broker redeliveries of events already dispatched (absorbed by the inbox)",
)
POISON_MESSAGES = Counter(
    "delivery_poison_messages_total", "Messages rejected as unprocessable", ["reason"]
)
DELIVERIES_CLAIMED = Counter(
    "delivery_scheduler_claimed_total", "Due deliveries claimed from PostgreSQL by the scheduler"
)
RETRIES_SCHEDULED = Counter(
    "delivery_retries_scheduled_total", "Attempts that failed and were scheduled again"
)
SUBSCRIPTIONS_DISABLED = Counter(
    "delivery_subscriptions_disabled_total", "Subscriptions disabled automatically", ["reason"]
)
UP = Gauge("delivery_component_ready", "1 when a component is connected and working", ["component"])
CIRCUIT_TRANSITIONS = Counter(
    "delivery_circuit_transitions_total", "Subscription circuit state changes", ["to"]
)
CIRCUITS_OPEN = Gauge(
    "delivery_circuits_open", "Subscriptions whose circuit is open (refreshed by the scheduler)"
)
THROTTLED = Counter(
    "delivery_throttled_total",
    "Attempts answered 429: the subscription is held back (Retry-After) and paced",
)
ORDERED_BLOCKED_ACCOUNTS = Gauge(
    "delivery_ordered_blocked_accounts",
    "Accounts of ordered subscriptions held by a dead letter until it is replayed or skipped"
    " (refreshed by the scheduler)",
)
SUBSCRIPTIONS_PACED = Gauge(
    "delivery_subscriptions_paced",
    "Subscriptions held back by a 429's Retry-After now (refreshed by the scheduler)",
)
PACING_WAIT = Counter(
    "delivery_pacing_wait_seconds_total",
    "Time requests waited for their throttled subscriber's pace in this process",
)
PACING_HAND_BACKS = Counter(
    "delivery_pacing_hand_backs_total",
    "Deliveries held in this process handed back unsent because their subscriber paused it",
)
ATTEMPT_LOOPS_BROKEN = Counter(
    "delivery_attempt_loops_broken_total",
    "Deliveries dead-lettered after being handed back too many times without a recorded outcome",
)
OUTCOMES_DEGRADED = Counter(
    "delivery_outcomes_degraded_total",
    "Attempt outcomes PostgreSQL refused as they were, recorded without excerpt and error text",
)
SUBSCRIPTIONS_UNLOADABLE = Counter(
    "delivery_subscriptions_unloadable_total",
    "Subscription rows dispatch could not load and skipped (per dispatched batch)",
)
SUBSCRIPTION_INDEX_RELOADS = Counter(
    "delivery_subscription_index_reloads_total",
    "Full reloads of a worker's subscription index, by why (start, resync, reconnect, behind)",
    ["reason"],
)
SUBSCRIPTION_INDEX_WAITS = Counter(
    "delivery_subscription_index_waits_total",
    "Batches dispatch held until its subscription index had the notifications of changes"
    " committed before the batch's events",
)
SUBSCRIPTION_INDEX_SIZE = Gauge(
    "delivery_subscription_index_size", "Subscriptions in this worker's in-memory index"
)
DATABASE_SERVER_CHANGES = Counter(
    "delivery_database_server_changes_total",
    "New database connections that landed on another server than the last one (a failover to"
    " a promoted standby, or a restart)",
)
AMQP_NODES_LISTED = Gauge(
    "delivery_amqp_nodes_listed", "RabbitMQ nodes listed in DELIVERY_AMQP_URL"
)
AMQP_NODES_REACHABLE = Gauge(
    "delivery_amqp_nodes_reachable",
    "Listed RabbitMQ nodes that answered this process's last AMQP handshake probe",
)
QUEUE_DEPTH = Gauge("delivery_queue_messages", "Messages ready in a broker queue", ["queue"])
# delivery_build_info{version="..."} 1: which release each scraped process runs.
BUILD_INFO = Info("delivery_build", "The running release of delivery-webhooks")
BUILD_INFO.info({"version": VERSION})
# Cluster-wide like the outbox gauges (every relay exports the same value: max(), never sum()).
LAG = Gauge(
    "delivery_lag_seconds",
    "Age since commit of the oldest event not yet delivered for the first time, by stage"
    " (outbox: not relayed; dispatch: relayed, not dispatched; delivery: no first outcome)",
    ["stage"],
)
# No tenant label: tenants are unbounded in number. Which tenant is refused is in the API's log.
INGEST_REJECTED = Counter(
    "delivery_ingest_rejected_events_total",
    "Events refused by a tenant's ingest rate: over_rate (wait Retry-After) or over_burst"
    " (a request larger than one second's worth: split it)",
    ["outcome"],
)
DELIVERIES_PENDING = Gauge(
    "delivery_deliveries_pending",
    "Deliveries waiting for an attempt (due or scheduled)",
    ["kind"],
)

# `delivery api`: route is the template (/v1/subscriptions/{id}), never the raw path.
API_REQUESTS = Counter(
    "delivery_api_requests_total", "HTTP API requests answered", ["route", "method", "status"]
)
API_REQUEST_DURATION = Histogram(
    "delivery_api_request_duration_seconds",
    "Time to answer one HTTP API request",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS_S[:13],
)


def _initialise_label_values() -> None:
    """Labelled series exist from the start at 0, so `increase()` sees their first event."""
    for outcome in ("delivered", "retry", "exhausted", "permanent", "gone"):
        ATTEMPTS.labels(outcome)
    for reason in ("exhausted", "permanent", "gone", "unrecorded"):
        DEAD_LETTERS.labels(reason)
    for state in ("active", "paused", "disabled"):
        SUBSCRIPTIONS.labels(state)
    for reason in ("gone", "failing"):
        SUBSCRIPTIONS_DISABLED.labels(reason)
    for reason in ("unparseable", "no_outbox_row", "recorded"):
        POISON_MESSAGES.labels(reason)
    for reason in ("timeout", "returned", "nack"):
        RELAY_PUBLISH_FAILURES.labels(reason)
    for to in ("open", "closed"):
        CIRCUIT_TRANSITIONS.labels(to)
    for outcome in ("over_rate", "over_burst"):
        INGEST_REJECTED.labels(outcome)
    for queue in ("dispatch", "dead"):
        QUEUE_DEPTH.labels(queue)


_initialise_label_values()

# The live stream (`GET /v1/stream`): no tenant label (tenants are many; the log names them).
STREAM_CLIENTS = Gauge("delivery_stream_clients", "Live stream clients connected now")
STREAM_CLIENTS_BEHIND = Counter(
    "delivery_stream_clients_behind_total",
    "Live stream clients closed with 4008 because their buffer was full",
)
STREAM_CLIENTS_REFUSED = Counter(
    "delivery_stream_clients_refused_total",
    "Live stream clients refused (1013) at the tenant's client limit",
)
# Stream freshness (runbooks/slo.md): from the event's outbox commit (created_at) to the write
# of its frame to a live client, history excluded. Observed once per batch of up to 64 frames a
# client's sender writes without waiting, with the batch's oldest (worst) frame: see
# delivery/api/stream.py for why not once per frame per client.
STREAM_FRAME_LAG = Histogram(
    "delivery_stream_frame_lag_seconds",
    "From an event's outbox commit to its live stream frame written to a client (per batch of"
    " up to 64 frames, its oldest)",
    buckets=_LATENCY_BUCKETS_S,
)
