-- Who put a published event back in the relay's path, and which publish it gave up for lost:
-- one entry per redrive, {"by": "sweep" | "poison", "at": <when>, "published_at": <the publish
-- it undid>}. "sweep": the relay's sweep of events published long ago without an inbox row;
-- "poison": the dead-letter recorder, for a valid event dead-lettered past x-delivery-limit.
-- NULL until the event's first redrive. The chaos checker judges every redrive by it.
--
-- Safe on a live outbox: a nullable column without a default is a catalogue change only (no
-- table rewrite, no scan). Its ACCESS EXCLUSIVE lock is brief but queues behind the relays' and
-- producers' open transactions, and every writer would queue behind it: lock_timeout makes the
-- migration give up after 5 s instead (nothing applied; run it again).
SET LOCAL lock_timeout = '5s';
ALTER TABLE delivery.outbox ADD COLUMN redrive_log jsonb;
