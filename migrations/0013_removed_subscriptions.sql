-- `subscriptions remove` keeps what on-call reads (deliveries, attempts, dead letters): the row
-- stays, in state 'removed', and no event is matched to it again. `remove --delete-history`
-- deletes the row and, by the cascade, its history.
ALTER TABLE delivery.subscriptions DROP CONSTRAINT subscriptions_state_check;
ALTER TABLE delivery.subscriptions ADD CONSTRAINT subscriptions_state_check
    CHECK (state IN ('active', 'disabled', 'removed'));
