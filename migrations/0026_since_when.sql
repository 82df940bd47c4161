-- `delivery status` says since when each unhealthy thing has been so (issue #19 item 5). A
-- subscription's state had no time of its own (updated_at moves with any edit), and a 429's
-- pacing only its end. Both are kept by a trigger rather than by each statement that changes
-- state or pacing, so no writer (CLI, API, worker, an operator's psql) can forget them.
SET LOCAL lock_timeout = '5s';

ALTER TABLE delivery.subscriptions
    ADD COLUMN state_changed_at timestamptz,
    ADD COLUMN paced_since      timestamptz;

-- Rows from before: their last edit is the best guess there is (an upper bound for the state's
-- start, so an age read from it is never longer than the truth).
UPDATE delivery.subscriptions SET state_changed_at = coalesce(updated_at, created_at);
UPDATE delivery.subscriptions SET paced_since = clock_timestamp()
    WHERE paced_until > clock_timestamp();
ALTER TABLE delivery.subscriptions
    ALTER COLUMN state_changed_at SET DEFAULT clock_timestamp(),
    ALTER COLUMN state_changed_at SET NOT NULL;

CREATE FUNCTION delivery.subscription_since() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.state IS DISTINCT FROM OLD.state THEN
        NEW.state_changed_at := clock_timestamp();
    END IF;
    -- Paced from when a pause began while none held it back; a pause that extends a pause
    -- still in force keeps the first one's start.
    IF NEW.paced_until IS DISTINCT FROM OLD.paced_until THEN
        IF NEW.paced_until IS NULL THEN
            NEW.paced_since := NULL;
        ELSIF OLD.paced_until IS NULL OR OLD.paced_until <= clock_timestamp() THEN
            NEW.paced_since := clock_timestamp();
        END IF;
    END IF;
    RETURN NEW;
END;
$$;

CREATE TRIGGER subscriptions_since BEFORE UPDATE ON delivery.subscriptions
    FOR EACH ROW EXECUTE FUNCTION delivery.subscription_since();

-- paced_since is pacing bookkeeping like paced_until (written by outcomes, not by subscription
-- management): it must not bump the version dispatch waits for (migration 0025).
-- state_changed_at moves only with state, which bumps it anyway.
CREATE OR REPLACE FUNCTION delivery.notify_subscription() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    bookkeeping constant text[] := ARRAY[
        'consecutive_failures', 'circuit_state', 'circuit_retry_at', 'failing_since',
        'paced_until', 'paced_since'
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
