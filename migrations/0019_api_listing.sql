-- `delivery api` lists a tenant's events newest first (GET /v1/events) and filters every
-- time window on created_at: one index serves both, read backwards by the keyset cursor.
CREATE INDEX outbox_tenant_created ON delivery.outbox (tenant_id, created_at, pk);
