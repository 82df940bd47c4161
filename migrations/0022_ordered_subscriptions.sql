-- delivery:no-transaction
-- Ordered subscriptions (`subscriptions add --ordered`): per (subscription, account), event
-- N+1 is not attempted until N was delivered or skipped (a dead letter holds the rest).
--
-- How: an ordered subscription's deliveries carry their event's account_id and sequence, and
-- are created "held" (next_attempt_at = 'infinity': never due, so the scheduler's claim and
-- its index are unchanged, and unordered subscriptions pay nothing). A cursor per
-- (subscription, account) says up to which sequence every event of the account is settled
-- for the subscription; advance_ordered walks it forward and releases (makes due) the one
-- delivery at its head. Triggers on deliveries call it whenever an ordered delivery is created,
-- finishes, is held again (a replay) or is dropped, in the same transaction, so no writer
-- (dispatch, outcomes, dlq replay/skip/purge, window replay) can forget to.
--
-- Safe on a live table, and rerunnable (no transaction, for CREATE INDEX CONCURRENTLY): new
-- columns are nullable or have a constant default (catalogue changes), the widened CHECK is
-- added NOT VALID and validated without blocking writers, and the brief locks give up after
-- 5 s rather than queue every writer behind a long transaction (run migrate again).
SET lock_timeout = '5s';

ALTER TABLE delivery.subscriptions ADD COLUMN IF NOT EXISTS ordered boolean NOT NULL DEFAULT false;

ALTER TABLE delivery.deliveries
    ADD COLUMN IF NOT EXISTS account_id text,
    ADD COLUMN IF NOT EXISTS sequence bigint;

-- 'skipped': a dead letter on-call chose not to send (`delivery dlq skip`); it releases the
-- account's later events of an ordered subscription. Kept, unlike a purged one.
ALTER TABLE delivery.deliveries
    DROP CONSTRAINT IF EXISTS deliveries_state_check,
    ADD CONSTRAINT deliveries_state_check
        CHECK (state IN ('pending', 'delivered', 'dead', 'skipped')) NOT VALID;
ALTER TABLE delivery.deliveries VALIDATE CONSTRAINT deliveries_state_check;

-- done_sequence: every event of the account up to it is delivered, skipped, or not the
-- subscription's (another type, or committed before the subscription existed).
CREATE TABLE IF NOT EXISTS delivery.ordered_cursors (
    subscription_id text   NOT NULL REFERENCES delivery.subscriptions (id) ON DELETE CASCADE,
    account_id      text   NOT NULL,
    done_sequence   bigint NOT NULL,
    PRIMARY KEY (subscription_id, account_id)
);

-- $3: the lowest sequence held again by this change (a replay), or NULL: the cursor steps
-- back to it, then walks forward again.
CREATE OR REPLACE FUNCTION delivery.advance_ordered(
    p_subscription text, p_account text, p_from bigint
) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    v_tenant text;
    v_created timestamptz;
    v_types text[];
    v_done bigint;
    v_event text;
    v_type text;
    v_dispatched boolean;
    v_id bigint;
    v_state text;
    v_next timestamptz;
BEGIN
    -- Its type globs as regular expressions (fnmatch's rules on the characters a pattern may
    -- hold: `*`, `?`, `[...]`, letters, digits, `_`, `.`, `-`), so whether an event is its
    -- own is read from the outbox row, without waiting for that event's dispatch.
    SELECT tenant_id, created_at,
           array(SELECT '^' || replace(replace(replace(p, '.', '\.'), '*', '.*'), '?', '.') || '$'
                 FROM unnest(event_patterns) AS p)
    INTO v_tenant, v_created, v_types
    FROM delivery.subscriptions WHERE id = p_subscription;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- First use: the account's events committed before the subscription existed are not its
    -- to order (one dispatched later still goes out: it steps the cursor back, below).
    INSERT INTO delivery.ordered_cursors (subscription_id, account_id, done_sequence)
    SELECT p_subscription, p_account, coalesce((
        SELECT o.sequence FROM delivery.outbox o
        WHERE o.tenant_id = v_tenant AND o.account_id = p_account AND o.created_at < v_created
        ORDER BY o.sequence DESC LIMIT 1), 0)
    ON CONFLICT DO NOTHING;
    -- The lock serialises every writer of this (subscription, account): two dispatchers, an
    -- outcome and a replay never release two heads.
    SELECT done_sequence INTO v_done FROM delivery.ordered_cursors
    WHERE subscription_id = p_subscription AND account_id = p_account FOR UPDATE;
    IF p_from IS NOT NULL AND p_from <= v_done THEN
        v_done := p_from - 1;
    END IF;
    LOOP
        -- The next event of the account; another type is not ours: stepped over.
        SELECT o.event_id, o.type,
               EXISTS (SELECT 1 FROM delivery.inbox i WHERE i.event_id = o.event_id)
        INTO v_event, v_type, v_dispatched
        FROM delivery.outbox o
        WHERE o.tenant_id = v_tenant AND o.account_id = p_account AND o.sequence = v_done + 1;
        EXIT WHEN NOT FOUND;
        IF v_type ~ ANY (v_types) THEN
            -- Ours but not dispatched yet (relays and workers race): nothing after it may go
            -- before it; its dispatch creates its delivery, whose trigger calls this again.
            EXIT WHEN NOT v_dispatched;
            SELECT d.id, d.state, d.next_attempt_at INTO v_id, v_state, v_next
            FROM delivery.deliveries d
            WHERE d.event_id = v_event AND d.subscription_id = p_subscription;
            -- No delivery although dispatched: dispatched before the subscription existed.
            IF FOUND AND v_state NOT IN ('delivered', 'skipped') THEN
                -- The head: due now if held; a dead one blocks the account until replay or
                -- skip.
                IF v_state = 'pending' AND v_next = 'infinity' THEN
                    UPDATE delivery.deliveries SET next_attempt_at = clock_timestamp()
                    WHERE id = v_id;
                END IF;
                EXIT;
            END IF;
        END IF;
        v_done := v_done + 1;
    END LOOP;
    UPDATE delivery.ordered_cursors SET done_sequence = v_done
    WHERE subscription_id = p_subscription AND account_id = p_account
      AND done_sequence <> v_done;
END $$;

-- Statement-level, with the changed rows as a table: one call per statement, and the pairs
-- locked in one order, so concurrent batches never deadlock on the cursors. An unordered
-- delivery (account_id NULL) costs one scan of the statement's rows.
CREATE OR REPLACE FUNCTION delivery.ordered_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT subscription_id, account_id,
               min(sequence) FILTER (WHERE state = 'pending' AND next_attempt_at = 'infinity')
                   AS held_from
        FROM new_rows WHERE account_id IS NOT NULL
        GROUP BY subscription_id, account_id ORDER BY subscription_id, account_id
    LOOP
        PERFORM delivery.advance_ordered(r.subscription_id, r.account_id, r.held_from);
    END LOOP;
    RETURN NULL;
END $$;

-- A state change (delivered, dead, skipped, replayed) or a delivery held again; a retry's new
-- time, or a release by advance_ordered itself, changes neither.
CREATE OR REPLACE FUNCTION delivery.ordered_updated() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM new_rows WHERE account_id IS NOT NULL) THEN
        RETURN NULL;
    END IF;
    FOR r IN
        SELECT n.subscription_id, n.account_id,
               min(n.sequence) FILTER (
                   WHERE n.state = 'pending' AND n.next_attempt_at = 'infinity') AS held_from
        FROM new_rows n JOIN old_rows o ON o.id = n.id
        WHERE n.account_id IS NOT NULL
          AND (n.state <> o.state
               OR (n.next_attempt_at = 'infinity' AND o.next_attempt_at <> 'infinity'))
        GROUP BY n.subscription_id, n.account_id ORDER BY n.subscription_id, n.account_id
    LOOP
        PERFORM delivery.advance_ordered(r.subscription_id, r.account_id, r.held_from);
    END LOOP;
    RETURN NULL;
END $$;

-- A purged dead letter no longer holds its account.
CREATE OR REPLACE FUNCTION delivery.ordered_deleted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    r record;
BEGIN
    FOR r IN
        SELECT subscription_id, account_id FROM old_rows
        WHERE account_id IS NOT NULL AND state IN ('pending', 'dead')
        GROUP BY subscription_id, account_id ORDER BY subscription_id, account_id
    LOOP
        PERFORM delivery.advance_ordered(r.subscription_id, r.account_id, NULL);
    END LOOP;
    RETURN NULL;
END $$;

DROP TRIGGER IF EXISTS deliveries_ordered_insert ON delivery.deliveries;
CREATE TRIGGER deliveries_ordered_insert AFTER INSERT ON delivery.deliveries
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery.ordered_inserted();
DROP TRIGGER IF EXISTS deliveries_ordered_update ON delivery.deliveries;
CREATE TRIGGER deliveries_ordered_update AFTER UPDATE ON delivery.deliveries
    REFERENCING NEW TABLE AS new_rows OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery.ordered_updated();
DROP TRIGGER IF EXISTS deliveries_ordered_delete ON delivery.deliveries;
CREATE TRIGGER deliveries_ordered_delete AFTER DELETE ON delivery.deliveries
    REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION delivery.ordered_deleted();

-- An ordered subscription's unfinished deliveries by account and sequence: the blocked
-- accounts (status, the gauge) and a replay's re-walk. Only ordered rows are in it.
DROP INDEX CONCURRENTLY IF EXISTS delivery.deliveries_ordered_unfinished;
CREATE INDEX CONCURRENTLY IF NOT EXISTS deliveries_ordered_unfinished
    ON delivery.deliveries (subscription_id, account_id, sequence)
    WHERE account_id IS NOT NULL AND state IN ('pending', 'dead');

RESET lock_timeout;
