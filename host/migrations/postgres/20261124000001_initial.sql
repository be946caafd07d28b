-- The same tables as the SQLite migrations, in PostgreSQL types. Times are BIGINT milliseconds
-- since the Unix epoch (the storage code's SQL is one text for both backends); booleans are
-- BIGINT 0/1 for the same reason.

-- Component bytes, stored once per content hash.
CREATE TABLE components (
    version     TEXT PRIMARY KEY,   -- sha256, lowercase hex
    bytes       BYTEA NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Every version a plugin name has had, with what `describe` said about it.
CREATE TABLE plugin_versions (
    plugin_name TEXT NOT NULL,
    version     TEXT NOT NULL REFERENCES components (version),
    check_info  TEXT NOT NULL,      -- JSON: name, version, description, steps, params_schema
    created_at  BIGINT NOT NULL,
    PRIMARY KEY (plugin_name, version)
);

CREATE TABLE plugins (
    name            TEXT PRIMARY KEY,
    active_version  TEXT NOT NULL,
    grant_toml      TEXT NOT NULL,  -- the manifest text, parsed by the host's config module
    updated_at      BIGINT NOT NULL,
    FOREIGN KEY (name, active_version) REFERENCES plugin_versions (plugin_name, version)
);

CREATE TABLE runs (
    id                TEXT PRIMARY KEY,   -- UUIDv7: sorts by creation time
    plugin_name       TEXT NOT NULL,
    plugin_version    TEXT NOT NULL,
    params            TEXT NOT NULL,      -- JSON
    labels            TEXT NOT NULL,      -- JSON object of strings
    status            TEXT NOT NULL,
    message           TEXT,
    poll_interval_ms  BIGINT NOT NULL,
    max_errors        BIGINT NOT NULL,
    error_count       BIGINT NOT NULL DEFAULT 0,
    current_step      BIGINT NOT NULL DEFAULT 0,
    idempotency_key   TEXT UNIQUE,
    created_at        BIGINT NOT NULL,
    started_at        BIGINT,
    finished_at       BIGINT,
    deadline_at       BIGINT NOT NULL,
    next_tick_at      BIGINT,             -- NULL once the run is terminal
    lease_owner       TEXT,               -- the node working on the run
    lease_expires_at  BIGINT,             -- by the database's clock
    lease_token       BIGINT NOT NULL DEFAULT 0,  -- fencing: bumped by every claim and cancel
    http_requests     BIGINT NOT NULL DEFAULT 0,
    schedule_id       TEXT,
    FOREIGN KEY (plugin_name, plugin_version) REFERENCES plugin_versions (plugin_name, version)
);

-- The scheduler finds due ticks through this index; terminal runs are not in it.
CREATE INDEX runs_due ON runs (next_tick_at) WHERE next_tick_at IS NOT NULL;
CREATE INDEX runs_plugin ON runs (plugin_name, id);
CREATE INDEX runs_status ON runs (status, id);
CREATE INDEX runs_schedule ON runs (schedule_id, id) WHERE schedule_id IS NOT NULL;
CREATE INDEX runs_lease_owner ON runs (lease_owner) WHERE lease_owner IS NOT NULL;

CREATE TABLE run_labels (
    run_id  TEXT NOT NULL REFERENCES runs (id),
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX run_labels_lookup ON run_labels (key, value, run_id);

CREATE TABLE steps (
    run_id            TEXT NOT NULL REFERENCES runs (id),
    position          BIGINT NOT NULL,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          BIGINT NOT NULL DEFAULT 0,
    timeout_ms        BIGINT,
    max_attempts      BIGINT,
    message           TEXT,
    output            TEXT,               -- JSON from a passed step
    first_attempt_at  BIGINT,
    last_attempt_at   BIGINT,
    finished_at       BIGINT,
    passed_after_ms   BIGINT,
    PRIMARY KEY (run_id, position)
);

CREATE TABLE attempts (
    run_id       TEXT NOT NULL REFERENCES runs (id),
    position     BIGINT NOT NULL,
    attempt      BIGINT NOT NULL,
    outcome      TEXT NOT NULL,
    message      TEXT,
    logs         TEXT NOT NULL,          -- JSON array of {level, message}
    started_at   BIGINT NOT NULL,
    duration_ms  BIGINT NOT NULL,
    due_at       BIGINT,                 -- when the tick was due: started_at - due_at is tick lag
    node         TEXT,                   -- the node that made the call
    PRIMARY KEY (run_id, position, attempt)
);

-- Recurring triggers that start runs (SPEC §2).
CREATE TABLE schedules (
    id                   TEXT PRIMARY KEY,   -- UUIDv7
    plugin_name          TEXT NOT NULL REFERENCES plugins (name),
    params               TEXT NOT NULL,
    labels               TEXT NOT NULL,
    poll_interval_ms     BIGINT,
    timeout_ms           BIGINT,
    trigger_kind         TEXT NOT NULL,      -- cron | interval | at
    cron_expr            TEXT,
    timezone             TEXT,
    interval_ms          BIGINT,
    jitter_ms            BIGINT,
    start_at             BIGINT,
    end_at               BIGINT,
    at                   BIGINT,
    misfire_grace_ms     BIGINT,
    coalesce             BIGINT NOT NULL,
    max_concurrent_runs  BIGINT NOT NULL,
    paused               BIGINT NOT NULL,
    next_fire_at         BIGINT,
    next_due_at          BIGINT,
    lease_owner          TEXT,
    lease_expires_at     BIGINT,
    lease_token          BIGINT NOT NULL DEFAULT 0,
    created_at           BIGINT NOT NULL,
    updated_at           BIGINT NOT NULL
);
CREATE INDEX schedules_due ON schedules (next_due_at) WHERE next_due_at IS NOT NULL AND paused = 0;

CREATE TABLE schedule_fires (
    schedule_id   TEXT NOT NULL REFERENCES schedules (id) ON DELETE CASCADE,
    scheduled_at  BIGINT NOT NULL,
    outcome       TEXT NOT NULL,             -- fired | missed | skipped
    reason        TEXT,
    run_id        TEXT,
    recorded_at   BIGINT NOT NULL,
    PRIMARY KEY (schedule_id, scheduled_at)
);
