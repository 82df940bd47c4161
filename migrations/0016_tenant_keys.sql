-- Sequences per (tenant, account), and publish_events with the tenant. Built on 0015's indexes,
-- so the brief ACCESS EXCLUSIVE locks below only swap catalogue entries (no scan, no build);
-- lock_timeout gives up after 5 s instead of stalling every producer (nothing applied; run
-- again). Both tables are locked at once, outbox first, so a producer holding one of them
-- cannot deadlock with this migration half-way.
SET LOCAL lock_timeout = '5s';
LOCK TABLE delivery.outbox, delivery.account_sequences IN ACCESS EXCLUSIVE MODE;

ALTER TABLE delivery.account_sequences DROP CONSTRAINT account_sequences_pkey;
ALTER TABLE delivery.account_sequences
    ADD CONSTRAINT account_sequences_pkey PRIMARY KEY USING INDEX account_sequences_tenant_account;

-- outbox_tenant_account_sequence (0015) keeps (tenant, account, sequence) unique instead.
ALTER TABLE delivery.outbox DROP CONSTRAINT outbox_account_id_sequence_key;

-- migrations/0007 says why a function, and how its one statement stays gapless; this is the
-- same statement with the tenant. Two refusals, each failing the whole call (nothing of the
-- batch stays written):
-- * an unknown tenant, checked first: SQLSTATE DLV02;
-- * an id already in the outbox under another tenant: SQLSTATE DLV01, the id in DETAIL. Event
--   ids are unique across tenants (the inbox and the deliveries key on them), so such an id is
--   not this tenant's duplicate. Checked after the insert, in a statement of its own: every id
--   the insert did not write is committed by then (skipped as already there, or the call fails
--   with serialization_failure as in 0007 and the caller's retry gets here), so a check before
--   the insert would miss an id another tenant commits between the two. A batch of new ids only
--   (the usual case) skips it.
CREATE FUNCTION delivery.publish_events(
    p_tenant text, p_ids text[], p_types text[], p_accounts text[], p_occurred timestamptz[],
    p_data text[], p_traceparents text[], OUT inserted text[]
) LANGUAGE plpgsql
SET plan_cache_mode = force_custom_plan SET jit = off AS $fn$
DECLARE
    fresh_n bigint;
    taken text;
BEGIN
    IF cardinality(p_ids) <= 32 THEN
        PERFORM set_config('plan_cache_mode', 'force_generic_plan', true);
    END IF;
    PERFORM FROM delivery.tenants WHERE id = p_tenant;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'tenant % does not exist', coalesce(quote_literal(p_tenant), 'NULL')
            USING ERRCODE = 'DLV02';
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
        INSERT INTO delivery.account_sequences AS s (tenant_id, account_id, last_sequence)
        SELECT p_tenant, account_id, n FROM counts ORDER BY account_id
        ON CONFLICT (tenant_id, account_id)
            DO UPDATE SET last_sequence = s.last_sequence + excluded.last_sequence
        RETURNING account_id, last_sequence
    ),
    ins AS (
        INSERT INTO delivery.outbox
            (tenant_id, event_id, type, account_id, sequence, occurred_at, data, traceparent)
        SELECT p_tenant, f.event_id, f.type, f.account_id,
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
    IF cardinality(inserted) < cardinality(p_ids) THEN
        SELECT o.event_id INTO taken FROM delivery.outbox o
        WHERE o.event_id = ANY (p_ids) AND o.tenant_id <> p_tenant LIMIT 1;
        IF taken IS NOT NULL THEN
            RAISE EXCEPTION 'event id % is used by another tenant', quote_literal(taken)
                USING ERRCODE = 'DLV01', DETAIL = taken;
        END IF;
    END IF;
END
$fn$;

-- The previous release's signature, for the `default` tenant: its producers (and SQL producers
-- that name no tenant) keep working through a rolling upgrade.
CREATE OR REPLACE FUNCTION delivery.publish_events(
    p_ids text[], p_types text[], p_accounts text[], p_occurred timestamptz[], p_data text[],
    p_traceparents text[], OUT inserted text[]
) LANGUAGE plpgsql SET jit = off AS $fn$
BEGIN
    inserted := delivery.publish_events(
        'default', p_ids, p_types, p_accounts, p_occurred, p_data, p_traceparents);
END
$fn$;
