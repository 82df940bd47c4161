-- A subscriber that answers 429 is paced: its Retry-After holds back the whole subscription
-- until paced_until, in every worker (claims and dispatch skip it until then).
ALTER TABLE delivery.subscriptions ADD COLUMN paced_until timestamptz;

-- Claims take a subscription's due retries before its first attempts (a probe after a pause
-- or a circuit cooldown is a retry, which may succeed, rather than a fresh event): an index
-- range scan over its retries alone, however many first attempts wait beside them.
CREATE INDEX deliveries_retries_due_by_subscription
    ON delivery.deliveries (subscription_id, next_attempt_at)
    WHERE state = 'pending' AND attempts > 0;
