-- Models made from a finished job's adapter (POST /v1/fine_tuning/jobs/{id}/exports):
-- queued by the API, built by a worker, which holds the row while it works
-- (worker_id, lease_expires_at_ms, renewed as it goes) so that a dead worker's export
-- is taken up again. Keep in step with ../sqlite/0008_exports.sql.
CREATE TABLE exports (
    id TEXT PRIMARY KEY,
    job_id TEXT NOT NULL,
    format TEXT NOT NULL,
    dtype TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    storage_key TEXT,
    bytes BIGINT,
    sha256 TEXT,
    worker_id TEXT,
    lease_expires_at_ms BIGINT,
    created_at BIGINT NOT NULL,
    finished_at BIGINT
);
CREATE INDEX exports_by_job ON exports (job_id, created_at);
CREATE INDEX exports_by_status ON exports (status, created_at);
