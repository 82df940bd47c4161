-- The web page (`/ui/`): sign-in sessions, and the `operator` key scope.
--
-- A session is what a browser holds instead of the key: a random id in an HttpOnly cookie,
-- stored here only as its SHA-256 (as keys are), tied to the key it was opened with. Revoking
-- the key ends its sessions at once (the join in the lookup, and ON DELETE CASCADE when a key
-- row goes). `csrf_token` is the per-session token the page sends in X-CSRF-Token on every
-- change. Expired rows are refused by the lookup and swept at each sign-in.
CREATE TABLE delivery.ui_sessions (
    id_hash    bytea       PRIMARY KEY,
    key_id     text        NOT NULL REFERENCES delivery.api_keys (id) ON DELETE CASCADE,
    csrf_token text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz NOT NULL
);

CREATE INDEX ui_sessions_expiry ON delivery.ui_sessions (expires_at);

-- `operator`: the platform's health across tenants (GET /v1/ops/...). A scope, not a tenant
-- flag, so an operator key can be handed out and revoked without making a tenant special.
-- NOT VALID would gain nothing: api_keys is small. A brief lock, bounded.
SET LOCAL lock_timeout = '5s';
ALTER TABLE delivery.api_keys DROP CONSTRAINT api_keys_scopes_check;
ALTER TABLE delivery.api_keys ADD CONSTRAINT api_keys_scopes_check
    CHECK (scopes <@ ARRAY['publish', 'manage', 'read', 'operator'] AND cardinality(scopes) > 0);
