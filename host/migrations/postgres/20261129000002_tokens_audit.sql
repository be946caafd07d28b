-- API tokens (SPEC §10): only a salted hash of each secret is kept.
CREATE TABLE tokens (
    name        TEXT PRIMARY KEY,
    role        TEXT NOT NULL,           -- viewer | runner | publisher | admin
    key_id      TEXT NOT NULL UNIQUE,    -- the public part of the token, to find its row
    salt        TEXT NOT NULL,
    hash        TEXT NOT NULL,           -- sha256(salt || secret), hex
    created_at  BIGINT NOT NULL,
    created_by  TEXT NOT NULL
);

-- Who changed what: uploads, activations, grant changes, token changes.
CREATE TABLE audit (
    id      BIGSERIAL PRIMARY KEY,
    at      BIGINT NOT NULL,
    actor   TEXT NOT NULL,               -- token name, `anonymous` (auth none), `cli`, `plugins-dir`
    action  TEXT NOT NULL,
    target  TEXT NOT NULL,
    detail  TEXT NOT NULL                -- JSON object
);
