-- Status pages (README, "Status pages") read daily aggregates, never raw runs, so that a page
-- over 90 days stays cheap and outlives run retention. A day is a calendar day in a time zone
-- a page names (`zone`); `day_start` is its first millisecond, which retention ages by. A
-- page reads a plugin's days by the primary key and a schedule's by its index, from a day on.
-- `schedule_id` is '' for runs no schedule started.

-- Finished runs not yet folded into the aggregates: written in the transaction that finishes
-- the run, taken out in the one that folds it, so each run is counted once.
CREATE TABLE rollup_queue (
    run_id       TEXT PRIMARY KEY,
    finished_at  INTEGER NOT NULL
);

CREATE TABLE rollup_days (
    zone           TEXT NOT NULL,
    plugin_name    TEXT NOT NULL,
    schedule_id    TEXT NOT NULL,
    day            TEXT NOT NULL,      -- YYYY-MM-DD in zone
    day_start      INTEGER NOT NULL,
    passed         INTEGER NOT NULL,
    failed         INTEGER NOT NULL,
    errored        INTEGER NOT NULL,
    timed_out      INTEGER NOT NULL,
    cancelled      INTEGER NOT NULL,
    last_finished_at  INTEGER NOT NULL,
    last_status    TEXT NOT NULL,
    PRIMARY KEY (zone, plugin_name, day, schedule_id)
);
CREATE INDEX rollup_days_schedule ON rollup_days (zone, schedule_id, day);
CREATE INDEX rollup_days_age ON rollup_days (day_start);

-- Per step: how often it passed, and how often a run ended on it.
CREATE TABLE rollup_steps (
    zone           TEXT NOT NULL,
    plugin_name    TEXT NOT NULL,
    schedule_id    TEXT NOT NULL,
    day            TEXT NOT NULL,
    position       INTEGER NOT NULL,
    name           TEXT NOT NULL,
    day_start      INTEGER NOT NULL,
    passed         INTEGER NOT NULL,
    ended_run      INTEGER NOT NULL,
    attempts       INTEGER NOT NULL,
    PRIMARY KEY (zone, plugin_name, day, schedule_id, position)
);
CREATE INDEX rollup_steps_schedule ON rollup_steps (zone, schedule_id, day);
CREATE INDEX rollup_steps_age ON rollup_steps (day_start);

-- Per step: a histogram of passed_after_ms in buckets about 4 % wide, which add up across
-- days where percentiles would not.
CREATE TABLE rollup_latency (
    zone           TEXT NOT NULL,
    plugin_name    TEXT NOT NULL,
    schedule_id    TEXT NOT NULL,
    day            TEXT NOT NULL,
    position       INTEGER NOT NULL,
    bucket         INTEGER NOT NULL,
    day_start      INTEGER NOT NULL,
    runs           INTEGER NOT NULL,
    PRIMARY KEY (zone, plugin_name, day, schedule_id, position, bucket)
);
CREATE INDEX rollup_latency_schedule ON rollup_latency (zone, schedule_id, day);
CREATE INDEX rollup_latency_age ON rollup_latency (day_start);

-- Consecutive failed runs of one plugin and schedule, in the order they finished; a passed
-- run ends the open one.
CREATE TABLE incidents (
    plugin_name    TEXT NOT NULL,
    schedule_id    TEXT NOT NULL,
    started_at     INTEGER NOT NULL,      -- the first failed run's finish
    ended_at       INTEGER,               -- the passed run's finish; NULL while open
    last_failed_at INTEGER NOT NULL,
    runs           INTEGER NOT NULL,
    failing_step   TEXT,
    status         TEXT NOT NULL,    -- the last failed run's status
    message        TEXT,             -- and its message
    PRIMARY KEY (plugin_name, schedule_id, started_at)
);
CREATE INDEX incidents_age ON incidents (last_failed_at);

INSERT INTO jobs (id, next_due_at) VALUES ('rollups', 0);
