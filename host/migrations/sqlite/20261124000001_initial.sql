-- Times are INTEGER milliseconds since the Unix epoch, so the same SQL works on PostgreSQL
-- (BIGINT) and comparisons never depend on text formats.

-- Component bytes, stored once per content hash.
CREATE TABLE components (
    version     TEXT PRIMARY KEY,   -- sha256, lowercase hex
    bytes       BLOB NOT NULL,
    created_at  INTEGER NOT NULL
);

-- Every version a plugin name has had, with what `describe` said about it.
CREATE TABLE plugin_versions (
    plugin_name TEXT NOT NULL,
    version     TEXT NOT NULL REFERENCES components (version),
    check_info  TEXT NOT NULL,      -- JSON: name, version, description, steps, params_schema
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (plugin_name, version)
);

CREATE TABLE plugins (
    name            TEXT PRIMARY KEY,
    active_version  TEXT NOT NULL,
    grant_toml      TEXT NOT NULL,  -- the manifest text, parsed by the host's config module
    updated_at      INTEGER NOT NULL,
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
    poll_interval_ms  INTEGER NOT NULL,
    max_errors        INTEGER NOT NULL,
    error_count       INTEGER NOT NULL DEFAULT 0,
    current_step      INTEGER NOT NULL DEFAULT 0,
    idempotency_key   TEXT UNIQUE,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER,
    deadline_at       INTEGER NOT NULL,
    next_tick_at      INTEGER,            -- NULL once the run is terminal
    lease_owner       TEXT,
    lease_expires_at  INTEGER,
    lease_token       INTEGER NOT NULL DEFAULT 0,
    FOREIGN KEY (plugin_name, plugin_version) REFERENCES plugin_versions (plugin_name, version)
);

-- The scheduler finds due ticks through this index; terminal runs are not in it.
CREATE INDEX runs_due ON runs (next_tick_at) WHERE next_tick_at IS NOT NULL;
CREATE INDEX runs_plugin ON runs (plugin_name, id);
CREATE INDEX runs_status ON runs (status, id);

CREATE TABLE run_labels (
    run_id  TEXT NOT NULL REFERENCES runs (id),
    key     TEXT NOT NULL,
    value   TEXT NOT NULL,
    PRIMARY KEY (run_id, key)
);
CREATE INDEX run_labels_lookup ON run_labels (key, value, run_id);

CREATE TABLE steps (
    run_id            TEXT NOT NULL REFERENCES runs (id),
    position          INTEGER NOT NULL,
    name              TEXT NOT NULL,
    status            TEXT NOT NULL,
    attempts          INTEGER NOT NULL DEFAULT 0,
    timeout_ms        INTEGER,
    max_attempts      INTEGER,
    message           TEXT,
    output            TEXT,               -- JSON from a passed step
    first_attempt_at  INTEGER,
    last_attempt_at   INTEGER,
    finished_at       INTEGER,
    passed_after_ms   INTEGER,
    PRIMARY KEY (run_id, position)
);

CREATE TABLE attempts (
    run_id       TEXT NOT NULL REFERENCES runs (id),
    position     INTEGER NOT NULL,
    attempt      INTEGER NOT NULL,
    outcome      TEXT NOT NULL,
    message      TEXT,
    logs         TEXT NOT NULL,          -- JSON array of {level, message}
    started_at   INTEGER NOT NULL,
    duration_ms  INTEGER NOT NULL,
    PRIMARY KEY (run_id, position, attempt)
);
