-- delivery:no-transaction
-- The lag gauge (delivery_lag_seconds{stage="delivery"}) reads, per active subscription, the
-- front of its deliveries still waiting for a first outcome: one index probe each, whatever the
-- backlog. first_attempt_at rather than attempts = 0: a replayed dead letter gets attempts = 0
-- again but keeps its first_attempt_at, and is not first-delivery lag.
-- CONCURRENTLY: deliveries is the busiest table; a plain CREATE INDEX would block its writers.
DROP INDEX CONCURRENTLY IF EXISTS delivery.deliveries_awaiting_first_outcome;
CREATE INDEX CONCURRENTLY deliveries_awaiting_first_outcome
    ON delivery.deliveries (subscription_id, created_at)
    WHERE state = 'pending' AND first_attempt_at IS NULL;
