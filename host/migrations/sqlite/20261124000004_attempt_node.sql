-- The node that made the call: with several nodes, shows where each attempt ran.
ALTER TABLE attempts ADD COLUMN node TEXT;
