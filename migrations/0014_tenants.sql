-- Tenants and their API keys. Every event and subscription belongs to a tenant; deliveries and
-- dead letters belong to their subscription's. Existing rows, and every producer that names no
-- tenant, belong to `default`.
--
-- Safe on a live outbox: a NOT NULL column with a constant default is a catalogue change only
-- (PostgreSQL 11+ stores the default once, no rewrite, no scan), so the existing rows move to
-- `default` without downtime. The brief ACCESS EXCLUSIVE locks queue behind open transactions;
-- lock_timeout gives up after 5 s instead of stalling every writer (nothing applied; run again).
SET LOCAL lock_timeout = '5s';

CREATE TABLE delivery.tenants (
    id                text PRIMARY KEY,
    name              text        NOT NULL UNIQUE,
    -- Quotas; NULL means unlimited. The ingest rate holds across every API process.
    max_events_per_s  integer     CHECK (max_events_per_s BETWEEN 1 AND 1000000),
    max_subscriptions integer     CHECK (max_subscriptions BETWEEN 0 AND 1000000),
    created_at        timestamptz NOT NULL DEFAULT now()
);

INSERT INTO delivery.tenants (id, name) VALUES ('default', 'default') ON CONFLICT DO NOTHING;

-- API keys: shown once, stored as SHA-256 of the whole key. A key is 32 random bytes, so a
-- plain hash is as strong against a leaked table as a slow one would be (nobody can enumerate
-- 2^256 candidates), and it costs one index lookup per request.
CREATE TABLE delivery.api_keys (
    id           text PRIMARY KEY,
    tenant_id    text        NOT NULL REFERENCES delivery.tenants (id) ON DELETE CASCADE,
    key_hash     bytea       NOT NULL UNIQUE,
    scopes       text[]      NOT NULL CHECK (scopes <@ ARRAY['publish', 'manage', 'read']
                                             AND cardinality(scopes) > 0),
    created_at   timestamptz NOT NULL DEFAULT now(),
    revoked_at   timestamptz
);

CREATE INDEX api_keys_tenant ON delivery.api_keys (tenant_id, created_at);

-- The shared ingest-rate state: one GCRA "theoretical arrival time" per tenant, advanced by
-- one UPDATE per request, so the limit holds across any number of API processes.
CREATE TABLE delivery.tenant_rates (
    tenant_id text PRIMARY KEY REFERENCES delivery.tenants (id) ON DELETE CASCADE,
    tat       timestamptz NOT NULL
);

ALTER TABLE delivery.outbox ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE delivery.account_sequences ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
ALTER TABLE delivery.subscriptions ADD COLUMN tenant_id text NOT NULL DEFAULT 'default';
-- NOT VALID: no scan under the lock; every existing row is `default`, which exists.
ALTER TABLE delivery.subscriptions ADD CONSTRAINT subscriptions_tenant_fk
    FOREIGN KEY (tenant_id) REFERENCES delivery.tenants (id) NOT VALID;
