-- The transactional outbox: producers insert here inside their own transaction.
-- Rows are kept after publishing: they are the event log that retries, replays and (later)
-- the resumable live stream read from.

CREATE TABLE delivery.account_sequences (
    account_id    text PRIMARY KEY,
    last_sequence bigint NOT NULL CHECK (last_sequence >= 0)
);

CREATE TABLE delivery.outbox (
    pk           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id     text        NOT NULL UNIQUE,
    type         text        NOT NULL,
    account_id   text        NOT NULL,
    sequence     bigint      NOT NULL,
    occurred_at  timestamptz NOT NULL,
    data         jsonb       NOT NULL,
    traceparent  text,
    created_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    published_at timestamptz,
    UNIQUE (account_id, sequence)
);

-- The relay's claim reads only this small index: unpublished rows in commit-ish order.
CREATE INDEX outbox_unpublished ON delivery.outbox (pk) WHERE published_at IS NULL;

-- Wake relays at commit (NOTIFY is transactional); one notification per statement is enough.
CREATE FUNCTION delivery.notify_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('delivery_outbox', '');
    RETURN NULL;
END;
$$;

CREATE TRIGGER outbox_notify AFTER INSERT ON delivery.outbox
    FOR EACH STATEMENT EXECUTE FUNCTION delivery.notify_outbox();
