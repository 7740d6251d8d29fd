-- API keys with owners. A key is an admin (sees every owner's rows) or not (sees only
-- its own). Files get an owner like jobs already have one (`jobs.api_key_id`); rows
-- created while the server ran without authentication, or with the static
-- `--api-key`, have no owner (NULL): only admins see them.
-- Keep in step with ../postgres/0004_api_key_owners.sql.
ALTER TABLE api_keys ADD COLUMN admin INTEGER NOT NULL DEFAULT 0 CHECK (admin IN (0, 1));
ALTER TABLE files ADD COLUMN api_key_id TEXT REFERENCES api_keys (id);
-- Owner-filtered listings, newest first.
CREATE INDEX files_owner_seq ON files (api_key_id, seq);
CREATE INDEX jobs_owner_seq ON jobs (api_key_id, seq);
