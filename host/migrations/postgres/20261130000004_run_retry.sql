-- A run's own backoff for errored attempts (SPEC §11), as JSON {"initial_ms", "factor", "max_ms"};
-- NULL: the grant's, else the poll interval.
ALTER TABLE runs ADD COLUMN retry TEXT;
