-- Live events (SPEC §14): one row per change to a run (a tick's write, a new run, a cancel),
-- read by every node's event hub for Server-Sent Events. On SQLite commits are serialised, so
-- `id` is the order in which changes became visible and serves as the event id.
CREATE TABLE events (
    id        INTEGER PRIMARY KEY AUTOINCREMENT,
    seq       INTEGER,            -- unused on SQLite (see the PostgreSQL migration)
    run_id    TEXT NOT NULL,
    position  INTEGER,            -- the step a tick wrote; NULL for a new or cancelled run
    at        INTEGER NOT NULL
);
CREATE INDEX events_at ON events (at);
