-- Producers publish through this function, in one round trip. Why a function and not the same
-- statement sent from Python: PostgreSQL re-planned that statement on every call (with the
-- arrays' real lengths a custom plan always looks cheaper than the generic one), and planning
-- was 40 % of a one-event publish's database CPU (0.41 ms against 0.26 ms here). A function can
-- choose: a small batch (what a producer's transaction usually carries) reuses one plan per
-- session; a large one is planned for its real size, since the small plan's nested loops would
-- be quadratic there (10,000 events on 10,000 accounts: 10.9 s against 0.25 s).
-- It also gives producers in other languages the same gapless per-account sequences.
--
-- One statement: skip ids already committed, count fresh events per account, bump each
-- account's counter (in account order, so concurrent batches lock in the same order and cannot
-- deadlock), and insert with consecutive sequences in the caller's order. A concurrent producer
-- committing one of our ids between our snapshot and our insert would leave a gap (its row is
-- skipped, its sequence was counted): then the whole statement fails with serialization_failure
-- and nothing of it stays; the caller runs it again and now sees that row.
CREATE FUNCTION delivery.publish_events(
    p_ids text[], p_types text[], p_accounts text[], p_occurred timestamptz[], p_data text[],
    p_traceparents text[], OUT inserted text[]
) LANGUAGE plpgsql
-- JIT would compile a large batch's plan at every call (hundreds of milliseconds).
SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
DECLARE
    fresh_n bigint;
BEGIN
    IF cardinality(p_ids) <= 32 THEN
        -- Local to this call: a function's SET clause restores the caller's value at exit.
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
    WITH input AS (
        SELECT * FROM unnest(p_ids, p_types, p_accounts, p_occurred, p_data, p_traceparents)
            WITH ORDINALITY AS t(event_id, type, account_id, occurred_at, data, traceparent, ord)
    ),
    fresh AS (
        SELECT DISTINCT ON (i.event_id) i.*
        FROM input i
        WHERE NOT EXISTS (SELECT 1 FROM delivery.outbox o WHERE o.event_id = i.event_id)
        ORDER BY i.event_id, i.ord
    ),
    counts AS (
        SELECT account_id, count(*) AS n FROM fresh GROUP BY account_id
    ),
    bumped AS (
        INSERT INTO delivery.account_sequences AS s (account_id, last_sequence)
        SELECT account_id, n FROM counts ORDER BY account_id
        ON CONFLICT (account_id)
            DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
        RETURNING account_id, last_sequence
    ),
    ins AS (
        INSERT INTO delivery.outbox
            (event_id, type, account_id, sequence, occurred_at, data, traceparent)
        SELECT f.event_id, f.type, f.account_id,
               b.last_sequence - c.n + row_number() OVER (PARTITION BY f.account_id ORDER BY f.ord),
               f.occurred_at, f.data::jsonb, f.traceparent
        FROM fresh f
        JOIN counts c USING (account_id)
        JOIN bumped b USING (account_id)
        ORDER BY f.ord
        ON CONFLICT (event_id) DO NOTHING
        RETURNING event_id
    )
    SELECT (SELECT coalesce(sum(n), 0) FROM counts)::bigint, array(SELECT event_id FROM ins)
    INTO fresh_n, inserted;
    IF cardinality(inserted) <> fresh_n THEN
        RAISE EXCEPTION 'an event id of this batch was committed by a concurrent producer'
            USING ERRCODE = 'serialization_failure';
    END IF;
END
$fn$;
