-- Live events (SPEC §14): one row per change to a run (a tick's write, a new run, a cancel),
-- read by every node's event hub for Server-Sent Events. Concurrent transactions commit out of
-- `id` order, so a reader that resumed after id 10 could miss an id 9 committed later. `seq` is
-- the event id instead: one transaction at a time (an advisory lock) numbers the rows that have
-- become visible, in `id` order, after the highest number given so far.
CREATE TABLE events (
    id        BIGSERIAL PRIMARY KEY,
    seq       BIGINT,
    run_id    TEXT NOT NULL,
    position  BIGINT,
    at        BIGINT NOT NULL
);
CREATE UNIQUE INDEX events_seq ON events (seq);
CREATE INDEX events_unnumbered ON events (id) WHERE seq IS NULL;
CREATE INDEX events_at ON events (at);
