-- Outbound HTTP requests made by a run's step calls so far, for the per-run cap.
ALTER TABLE runs ADD COLUMN http_requests INTEGER NOT NULL DEFAULT 0;

-- When the tick that made this call was due (NULL for a step tried at once after the previous
-- one passed): started_at - due_at is the scheduler's tick lag.
ALTER TABLE attempts ADD COLUMN due_at INTEGER;
