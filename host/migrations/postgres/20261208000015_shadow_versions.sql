-- Shadow versions (README, "Changing a plugin while the server runs"): a version that runs
-- beside the active one on the same triggers and decides nothing. `shadows` keeps each
-- shadow's life, from its start to the decision that ended it; at most one per plugin is
-- current (`ended_at` NULL), and the decision's conditional update is what makes it happen
-- once, whichever node decides.
CREATE TABLE shadows (
    id          TEXT PRIMARY KEY,          -- UUIDv7
    plugin_name TEXT NOT NULL,
    version     TEXT NOT NULL,
    started_at  BIGINT NOT NULL,
    started_by  TEXT NOT NULL,
    ended_at    BIGINT,
    outcome     TEXT,                      -- promoted | dropped | replaced | stopped
    ended_by    TEXT,
    figures     TEXT                       -- JSON: the comparison the decision was made on
);
CREATE UNIQUE INDEX shadows_current ON shadows (plugin_name) WHERE ended_at IS NULL;
CREATE INDEX shadows_plugin ON shadows (plugin_name, started_at);

-- A shadow run names the run it shadows; primaries leave it NULL, so neither index holds them.
ALTER TABLE runs ADD COLUMN shadow_of TEXT;
CREATE INDEX runs_shadows ON runs (plugin_name, plugin_version, created_at) WHERE shadow_of IS NOT NULL;
CREATE INDEX runs_shadow_of ON runs (shadow_of) WHERE shadow_of IS NOT NULL;
