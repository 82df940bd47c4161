-- Per-subscription health: a circuit breaker shared by every worker, and the time a subscriber
-- started failing (for automatic disabling after a long outage).
ALTER TABLE delivery.subscriptions
    ADD COLUMN timeout_s            double precision,
    ADD COLUMN consecutive_failures integer     NOT NULL DEFAULT 0,
    ADD COLUMN circuit_state        text        NOT NULL DEFAULT 'closed'
                                    CHECK (circuit_state IN ('closed', 'open')),
    ADD COLUMN circuit_retry_at     timestamptz,
    ADD COLUMN failing_since        timestamptz;

-- Messages our workers could not process at all (unparseable, or over x-delivery-limit), as the
-- dead-letter queue's consumer recorded them. Kept for inspection and replay.
CREATE TABLE delivery.poison_messages (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    received_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    message_id   text,
    routing_key  text,
    reason       text        NOT NULL,
    death_count  integer,
    headers      jsonb       NOT NULL DEFAULT '{}',
    body         bytea       NOT NULL
);
