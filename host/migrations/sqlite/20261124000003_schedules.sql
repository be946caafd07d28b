-- Recurring triggers that start runs (SPEC §2). The next fire time is stored and indexed, so
-- the scheduler finds due schedules without scanning them all.
CREATE TABLE schedules (
    id                   TEXT PRIMARY KEY,   -- UUIDv7
    plugin_name          TEXT NOT NULL REFERENCES plugins (name),
    params               TEXT NOT NULL,      -- JSON object, validated at creation
    labels               TEXT NOT NULL,      -- JSON object of strings, given to every run
    poll_interval_ms     INTEGER,
    timeout_ms           INTEGER,
    trigger_kind         TEXT NOT NULL,      -- cron | interval | at
    cron_expr            TEXT,
    timezone             TEXT,
    interval_ms          INTEGER,
    jitter_ms            INTEGER,
    start_at             INTEGER,
    end_at               INTEGER,
    at                   INTEGER,
    misfire_grace_ms     INTEGER,            -- NULL: a fire is never too late
    coalesce             INTEGER NOT NULL,
    max_concurrent_runs  INTEGER NOT NULL,
    paused               INTEGER NOT NULL,
    next_fire_at         INTEGER,            -- the nominal time; NULL once the trigger is done
    next_due_at          INTEGER,            -- next_fire_at plus this fire's jitter
    lease_owner          TEXT,
    lease_expires_at     INTEGER,
    lease_token          INTEGER NOT NULL DEFAULT 0,
    created_at           INTEGER NOT NULL,
    updated_at           INTEGER NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_due_at) WHERE next_due_at IS NOT NULL AND paused = 0;

-- Every fire time a schedule reached, and what became of it. The key makes a fire happen at
-- most once, whichever node or retry gets there.
CREATE TABLE schedule_fires (
    schedule_id   TEXT NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    scheduled_at  INTEGER NOT NULL,
    outcome       TEXT NOT NULL,             -- fired | missed | skipped
    reason        TEXT,
    run_id        TEXT,
    recorded_at   INTEGER NOT NULL,
    PRIMARY KEY (schedule_id, scheduled_at)
);

ALTER TABLE runs ADD COLUMN schedule_id TEXT;
CREATE INDEX runs_schedule ON runs (schedule_id, id) WHERE schedule_id IS NOT NULL;
