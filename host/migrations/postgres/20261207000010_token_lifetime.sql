-- A revoked token stays, marked, so that its name is never given to another token (whose
-- audit entries and idempotency keys would read as the old one's); a token may expire.
ALTER TABLE tokens ADD COLUMN revoked_at BIGINT;
ALTER TABLE tokens ADD COLUMN expires_at BIGINT;
