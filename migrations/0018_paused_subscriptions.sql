-- A `paused` subscription (`delivery subscriptions pause`, `POST .../pause`): unlike a disabled
-- one, it keeps receiving its events as pending deliveries, which no worker claims while it is
-- paused; on resume they go out in order. The table is small (one row per subscription), so
-- checking the new constraint under the lock is brief; lock_timeout gives up after 5 s rather
-- than stall dispatch behind an open transaction (nothing applied; run again).
SET LOCAL lock_timeout = '5s';

ALTER TABLE delivery.subscriptions DROP CONSTRAINT subscriptions_state_check;
ALTER TABLE delivery.subscriptions ADD CONSTRAINT subscriptions_state_check
    CHECK (state IN ('active', 'paused', 'disabled', 'removed'));
