-- Each claim of an export moves its fencing token on. A worker whose lease lapsed is
-- fenced off by its claim, not by its name (a restarted process can come back under
-- the same one), and names its blob and work folder by claim, so that two holders of
-- one export never touch each other's files. Keep in step with ../sqlite/0009_export_claims.sql.
ALTER TABLE exports ADD COLUMN fencing_token BIGINT NOT NULL DEFAULT 0;

-- One export per job, format and dtype that has not failed, so that two identical POSTs
-- at once queue one export. Rows that would break it (from before this migration) end
-- as failed, the oldest of each kind kept.
UPDATE exports SET status = 'failed',
    error = 'A duplicate of an earlier export of the same format and dtype.',
    lease_expires_at_ms = NULL
WHERE status <> 'failed' AND EXISTS (
    SELECT 1 FROM exports o
    WHERE o.job_id = exports.job_id AND o.format = exports.format
      AND o.dtype = exports.dtype AND o.status <> 'failed'
      AND (o.created_at < exports.created_at
           OR (o.created_at = exports.created_at AND o.id < exports.id))
);
CREATE UNIQUE INDEX exports_one_per_kind ON exports (job_id, format, dtype)
    WHERE status <> 'failed';
