-- The inbox: one row per event a worker has dispatched. A redelivered message finds its row and
-- creates nothing new; the counter explains every duplicate the broker handed us.
CREATE TABLE delivery.inbox (
    event_id      text PRIMARY KEY,
    received_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    redeliveries  integer     NOT NULL DEFAULT 0
);

-- One row per (event, subscription): the durable state of a webhook delivery. Attempts are
-- leased (lease_until) so a crashed worker's delivery is picked up again after the lease.
CREATE TABLE delivery.deliveries (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id         text        NOT NULL,
    subscription_id  text        NOT NULL REFERENCES delivery.subscriptions (id) ON DELETE CASCADE,
    state            text        NOT NULL DEFAULT 'pending'
                     CHECK (state IN ('pending', 'delivered', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    lease_until      timestamptz,
    created_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    first_attempt_at timestamptz,
    last_attempt_at  timestamptz,
    delivered_at     timestamptz,
    last_status      integer,
    last_error       text,
    dead_reason      text,
    dead_at          timestamptz,
    UNIQUE (event_id, subscription_id)
);

CREATE INDEX deliveries_due ON delivery.deliveries (next_attempt_at) WHERE state = 'pending';
CREATE INDEX deliveries_dead ON delivery.deliveries (subscription_id, dead_at) WHERE state = 'dead';
CREATE INDEX deliveries_subscription ON delivery.deliveries (subscription_id, state);

-- Every HTTP attempt, for the on-call person's "what did the subscriber say".
CREATE TABLE delivery.attempts (
    id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    delivery_id      bigint      NOT NULL REFERENCES delivery.deliveries (id) ON DELETE CASCADE,
    attempt          integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    outcome          text        NOT NULL,
    status           integer,
    error            text,
    response_excerpt text
);

CREATE INDEX attempts_delivery ON delivery.attempts (delivery_id);
