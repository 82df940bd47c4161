-- The scheduler claims due work subscription by subscription (an index range scan each, stopping
-- at that subscription's free slots), so a saturated subscriber's backlog is never walked: with
-- the old global index a claim that had to skip one subscriber's 200,000 pending rows scanned
-- them all, every time a slot freed. This index replaces that one (one index fewer to write).
CREATE INDEX deliveries_due_by_subscription
    ON delivery.deliveries (subscription_id, next_attempt_at) WHERE state = 'pending';
DROP INDEX delivery.deliveries_due;
