-- Notifications (SPEC §11): the outbox. A row is written in the transaction that finishes a run,
-- one per notifier and event; delivery workers on any node claim it with the same leases as runs.
CREATE TABLE notifications (
    id                TEXT PRIMARY KEY,   -- UUIDv7; sent as X-Stepwise-Delivery
    run_id            TEXT NOT NULL,
    notifier          TEXT NOT NULL,      -- a [[notify]] name: the URL stays in the config
    event             TEXT NOT NULL,      -- failed | timed_out | errored | recovered
    status            TEXT NOT NULL,      -- pending | delivered | failed
    attempts          INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    next_attempt_at   INTEGER,            -- NULL once delivered or failed
    finished_at       INTEGER,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    lease_token       INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE next_attempt_at IS NOT NULL;
CREATE INDEX notifications_run ON notifications (run_id);

CREATE TABLE notification_attempts (
    notification_id  TEXT NOT NULL,
    attempt          INTEGER NOT NULL,
    node             TEXT NOT NULL,
    started_at       INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    status_code      INTEGER,             -- NULL when no answer came
    error            TEXT,
    PRIMARY KEY (notification_id, attempt)
);

-- The failing streak of each series of runs (a schedule, or a plugin with its labels) that a
-- notifier watches: `recovered` and `after_consecutive` are decided from it in the transaction
-- that finishes a run, so concurrent runs of one series take turns on its row.
CREATE TABLE notify_streaks (
    series             TEXT PRIMARY KEY,
    failures           INTEGER NOT NULL,
    previous_failures  INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);

-- Background jobs that one node at a time does (retention), leased like runs.
CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    next_due_at       INTEGER,
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    lease_token       INTEGER NOT NULL DEFAULT 0,
    -- The newest run id retention deleted: a missing id up to it is answered run_expired.
    expired_runs_through  TEXT
);
INSERT INTO jobs (id, next_due_at) VALUES ('retention', 0);

-- What retention looks rows up by.
CREATE INDEX attempts_started ON attempts (started_at);
CREATE INDEX runs_finished ON runs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX schedule_fires_scheduled ON schedule_fires (scheduled_at);
CREATE INDEX notify_streaks_updated ON notify_streaks (updated_at);
