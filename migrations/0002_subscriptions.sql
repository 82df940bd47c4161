CREATE TABLE delivery.subscriptions (
    id                  text PRIMARY KEY,
    url                 text        NOT NULL,
    event_patterns      text[]      NOT NULL,
    account_id          text,
    state               text        NOT NULL DEFAULT 'active'
                        CHECK (state IN ('active', 'disabled')),
    disabled_reason     text,
    secret              text        NOT NULL,
    -- The rotated-out secret keeps signing until it expires, so subscribers can switch over.
    previous_secret     text,
    previous_secret_expires_at timestamptz,
    retry_schedule_s    double precision[],
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX subscriptions_active ON delivery.subscriptions (state);
