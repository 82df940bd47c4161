-- How each subscription signs: 'hmac' (Standard Webhooks v1, whsec_ secrets; every existing
-- subscription) or 'ed25519' (v1a, a whsk_ secret key kept here, whpk_ given to the subscriber).
--
-- Safe on a live table: a NOT NULL column with a constant default is a catalogue change (no
-- rewrite). The CHECK reads the existing rows once under the lock, which is brief: the table
-- holds one row per subscription, not per event. lock_timeout gives up after 5 s rather than
-- queue every writer behind a long transaction (nothing applied; run migrate again).
--
-- No column change is needed for secrets at rest: a sealed secret is stored in the same text
-- columns as `fernet:<token>`, and a plaintext one from before still reads (delivery.secrets).
SET LOCAL lock_timeout = '5s';

ALTER TABLE delivery.subscriptions
    ADD COLUMN signing text NOT NULL DEFAULT 'hmac'
    CONSTRAINT subscriptions_signing_check CHECK (signing IN ('hmac', 'ed25519'));
