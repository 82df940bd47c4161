-- delivery:no-transaction
-- The indexes the tenant keys need, built without blocking writers (CONCURRENTLY cannot run in
-- a transaction, hence the marker). 0016 then turns them into the keys under a brief lock.
-- Rerunnable after a failure: a failed CONCURRENTLY build leaves an invalid index behind, which
-- IF NOT EXISTS alone would keep, so each index is dropped first.

-- The per-(tenant, account) sequence counter; 0016 makes it the table's primary key.
DROP INDEX CONCURRENTLY IF EXISTS delivery.account_sequences_tenant_account;
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS account_sequences_tenant_account
    ON delivery.account_sequences (tenant_id, account_id);

-- Sequences are gapless per (tenant, account): this replaces UNIQUE (account_id, sequence),
-- which 0016 drops.
DROP INDEX CONCURRENTLY IF EXISTS delivery.outbox_tenant_account_sequence;
CREATE UNIQUE INDEX CONCURRENTLY IF NOT EXISTS outbox_tenant_account_sequence
    ON delivery.outbox (tenant_id, account_id, sequence);

-- A tenant's events newest first (the API's event listing pages on pk).
DROP INDEX CONCURRENTLY IF EXISTS delivery.outbox_tenant_newest;
CREATE INDEX CONCURRENTLY IF NOT EXISTS outbox_tenant_newest
    ON delivery.outbox (tenant_id, pk);
