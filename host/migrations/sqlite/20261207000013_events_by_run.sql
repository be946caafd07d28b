-- A run's event stream resumed from an old Last-Event-ID reads only that run's changes: without
-- this index it scanned every change after the id.
CREATE INDEX events_run ON events (run_id, id);
