-- Events the broker lost after confirming them (a queue deleted by hand, messages dead-lettered
-- past x-delivery-limit by connection flaps) are put back in the relay's path. The counter bounds
-- it, so a message that crashes every worker ends in the dead letters instead of looping.
ALTER TABLE delivery.outbox ADD COLUMN redrives integer NOT NULL DEFAULT 0;
CREATE INDEX outbox_recently_published ON delivery.outbox (published_at)
    WHERE published_at IS NOT NULL;
