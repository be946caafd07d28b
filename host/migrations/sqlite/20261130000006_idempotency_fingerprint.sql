-- The request an idempotency key was first used with (sha256 of its canonical JSON), so that the
-- same key with another request is refused instead of answered with the first run.
ALTER TABLE runs ADD COLUMN idempotency_fingerprint TEXT;
