-- Who did what, on a server that several teams share.
-- A token may be confined to plugins whose names match its patterns (comma-separated; NULL is
-- every plugin).
ALTER TABLE tokens ADD COLUMN plugins TEXT;
-- Who stored each version, and who let it run under the plugin's grant (NULL: no one yet).
-- Versions stored before review existed keep running as they did: they count as reviewed,
-- by no one named ('').
ALTER TABLE plugin_versions ADD COLUMN uploaded_by TEXT;
ALTER TABLE plugin_versions ADD COLUMN reviewed_by TEXT;
UPDATE plugin_versions SET reviewed_by = '' WHERE reviewed_by IS NULL;
-- The token that triggered or cancelled a run, and that created a schedule.
ALTER TABLE runs ADD COLUMN created_by TEXT;
ALTER TABLE runs ADD COLUMN cancelled_by TEXT;
ALTER TABLE schedules ADD COLUMN created_by TEXT;
