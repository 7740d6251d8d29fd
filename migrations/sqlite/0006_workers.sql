-- The workers that are up, with their device's memory, so that the API (which may run
-- in another process) can refuse a job no worker could hold. A worker upserts its row
-- when it starts and as it polls; rows not seen for a while are ignored, not trusted.
-- Keep in step with ../postgres/0006_workers.sql.
CREATE TABLE workers (
    id TEXT PRIMARY KEY,
    device TEXT NOT NULL,
    device_kind TEXT NOT NULL,
    total_bytes INTEGER NOT NULL,
    free_bytes INTEGER NOT NULL,
    seen_at_ms INTEGER NOT NULL
);
