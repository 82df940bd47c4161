-- Workers match events from an in-memory index of the subscriptions (delivery/worker/index.py),
-- kept fresh by a notification on `delivery_subscriptions` for every changed row (payload:
-- "VERSION ID"). A change to what decides a match or a webhook (anything but the circuit and
-- pacing bookkeeping, which outcomes write on every failure) also bumps the one-row version:
-- dispatch reads it with the outbox rows and waits until its index has seen that version, so
-- an event is never matched against subscriptions older than its own commit. Bumping locks the
-- row until commit, so versions commit (and are notified) in order; only subscription
-- management takes that lock, never the delivery path. Bookkeeping changes notify version 0.
-- CREATE TRIGGER locks the table only briefly; lock_timeout gives up rather than stall dispatch
-- behind an open transaction (nothing applied; run again).
SET LOCAL lock_timeout = '5s';

CREATE TABLE delivery.subscriptions_version (
    one     boolean PRIMARY KEY DEFAULT true CHECK (one),
    version bigint  NOT NULL
);
INSERT INTO delivery.subscriptions_version (version) VALUES (1);

CREATE FUNCTION delivery.notify_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bookkeeping constant text[] := ARRAY[
        'consecutive_failures', 'circuit_state', 'circuit_retry_at', 'failing_since',
        'paced_until'
    ];
    v bigint := 0;
BEGIN
    IF TG_OP <> 'UPDATE' OR (to_jsonb(NEW) - bookkeeping) IS DISTINCT FROM (to_jsonb(OLD) - bookkeeping) THEN
        UPDATE delivery.subscriptions_version SET version = version + 1 RETURNING version INTO v;
    ELSIF to_jsonb(NEW) IS NOT DISTINCT FROM to_jsonb(OLD) THEN
        RETURN NULL;  -- nothing changed (an UPDATE that set what was there)
    END IF;
    PERFORM pg_notify('delivery_subscriptions', v::text || ' ' || coalesce(NEW.id, OLD.id));
    RETURN NULL;
END;
$$;

CREATE TRIGGER subscriptions_notify AFTER INSERT OR UPDATE OR DELETE ON delivery.subscriptions
    FOR EACH ROW EXECUTE FUNCTION delivery.notify_subscription();
