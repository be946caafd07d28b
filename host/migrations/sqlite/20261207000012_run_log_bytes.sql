-- The bytes of plugin log lines stored with a run's attempts so far: the runner keeps at most
-- `run_log_bytes` per run and drops the rest, saying so in the attempt's logs.
ALTER TABLE runs ADD COLUMN log_bytes INTEGER NOT NULL DEFAULT 0;
