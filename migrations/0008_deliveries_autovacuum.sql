-- delivery.deliveries is a work queue, not an append-only log: every row is updated once or more
-- (leased, then delivered), and the scheduler's claim reads the front of the pending index, where
-- the entries of rows delivered since the last vacuum pile up. A claim visits each of them: with
-- 200,000 not yet vacuumed, reading the first 64 due rows took 250-500 ms (8,000-20,000 buffers)
-- against 0.1-0.3 ms after a vacuum (measured during a 1,000,000-event backlog). PostgreSQL's
-- default waits until 20 % of the table is dead before it vacuums; here it is 2 % (20,000 rows of
-- a 1,000,000-row table), and statistics follow at the same pace.
ALTER TABLE delivery.deliveries SET (
    autovacuum_vacuum_scale_factor = 0.02,
    autovacuum_vacuum_threshold = 1000,
    autovacuum_analyze_scale_factor = 0.02
);
