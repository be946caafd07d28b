-- Recordings (README, "Debugging a failed run"): an attempt's capability calls, log lines and
-- outcome as JSON Lines, compressed with zstd, beside the attempt they belong to and deleted
-- with it. `runs.recording_bytes` counts what the run's recordings took before compression,
-- which `run_recording_bytes` bounds.
ALTER TABLE attempts ADD COLUMN recording BLOB;
ALTER TABLE runs ADD COLUMN recording_bytes BIGINT NOT NULL DEFAULT 0;
