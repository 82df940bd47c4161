-- How many times a worker gave a delivery back without recording an outcome (its attempt
-- crashed, or the outcome could not be written). After a few the delivery goes to the dead
-- letters with the reason instead of being POSTed again and again; a replay starts it at 0.
--
-- Safe on a live table: a column with a constant default is a catalogue change only (no
-- rewrite, no scan). lock_timeout: give up after 5 s rather than queue every writer behind it.
SET LOCAL lock_timeout = '5s';
ALTER TABLE delivery.deliveries ADD COLUMN unrecorded_handbacks integer NOT NULL DEFAULT 0;
