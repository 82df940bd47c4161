-- delivery:no-transaction
-- The live stream's feed and the balances snapshot (`delivery api`). Each statement commits on
-- its own (the index is built CONCURRENTLY, so no writer is blocked while it builds); every one
-- can run again after a failure.
SET lock_timeout = '5s';

-- Which transaction wrote each outbox row. `pk` order is not commit order across transactions
-- (a lower pk can commit later), so the stream's feed reads `tx >= the oldest transaction in
-- progress at its previous read` instead of `pk > the last pk seen`: a transaction older than a
-- snapshot's xmin has ended, so all of its rows were visible to that read. One ALTER with both
-- clauses: the column is added without a default (no rewrite of the table), and only rows
-- written from now on get one. Older rows stay NULL: the stream reads them as history only.
ALTER TABLE delivery.outbox
    ADD COLUMN IF NOT EXISTS tx xid8,
    ALTER COLUMN tx SET DEFAULT pg_current_xact_id();

DROP INDEX CONCURRENTLY IF EXISTS delivery.outbox_tx;
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_tx ON delivery.outbox (tx) WHERE tx IS NOT NULL;

-- The balances snapshot: one row per (tenant, account, asset), the balance carried by the
-- account's latest `account.balance_changed` event for that asset, and that event's sequence.
-- Written in the publishing transaction by the trigger below, so the snapshot is consistent
-- with delivery.account_sequences (bumped in the same transaction) as of any read.
CREATE TABLE IF NOT EXISTS delivery.account_balances (
    tenant_id  text    NOT NULL,
    account_id text    NOT NULL,
    asset      text    NOT NULL,
    balance    numeric NOT NULL,
    sequence   bigint  NOT NULL,
    PRIMARY KEY (tenant_id, account_id, asset)
);

-- A row whose balance is not a number (an SQL producer skipping validation) is not counted
-- rather than failing the publish: the webhook path never depends on the snapshot. (No line of
-- the body ends in ';': this file is split into statements at such lines.)
CREATE OR REPLACE FUNCTION delivery.apply_balance() RETURNS trigger LANGUAGE plpgsql AS $fn$
BEGIN
    IF NEW.data->>'asset' IS NOT NULL
       AND NEW.data->>'balance' ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$' THEN
        INSERT INTO delivery.account_balances AS b
            (tenant_id, account_id, asset, balance, sequence)
        VALUES (NEW.tenant_id, NEW.account_id, NEW.data->>'asset',
                (NEW.data->>'balance')::numeric, NEW.sequence)
        ON CONFLICT (tenant_id, account_id, asset) DO UPDATE
            SET balance = excluded.balance, sequence = excluded.sequence
            WHERE b.sequence < excluded.sequence
    ; END IF
    ; RETURN NULL
; END
$fn$;

-- Only balance events pay for the trigger (the WHEN is checked without calling the function).
CREATE OR REPLACE TRIGGER outbox_balances AFTER INSERT ON delivery.outbox
    FOR EACH ROW WHEN (NEW.type = 'account.balance_changed')
    EXECUTE FUNCTION delivery.apply_balance();

-- Balances from events published before the trigger existed (once; the trigger keeps them
-- since). CREATE TRIGGER waited for every transaction writing the outbox, so none is missed;
-- the sequence guard keeps whichever of this and the trigger saw the later event.
INSERT INTO delivery.account_balances AS b (tenant_id, account_id, asset, balance, sequence)
SELECT DISTINCT ON (tenant_id, account_id, data->>'asset')
       tenant_id, account_id, data->>'asset', (data->>'balance')::numeric, sequence
FROM delivery.outbox
WHERE type = 'account.balance_changed' AND data->>'asset' IS NOT NULL
  AND data->>'balance' ~ '^[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,4})?$'
ORDER BY tenant_id, account_id, data->>'asset', sequence DESC
ON CONFLICT (tenant_id, account_id, asset) DO UPDATE
    SET balance = excluded.balance, sequence = excluded.sequence
    WHERE b.sequence < excluded.sequence;

RESET lock_timeout;
