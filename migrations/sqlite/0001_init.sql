-- loraforge schema, SQLite flavour. Keep in step with ../postgres/0001_init.sql:
-- the same tables, columns and meanings; only types and id generation differ.
--
-- Conventions shared by both backends (so one Rust code path decodes both):
--   * timestamps are INTEGER unix seconds (`*_at`), or unix milliseconds where a
--     lease needs sub-second precision (`*_at_ms`);
--   * JSON documents are TEXT holding JSON (no JSON operators are needed in SQL);
--   * public ids are TEXT with an OpenAI-style prefix (`file-…`, `ftjob-…`);
--     `seq` gives a stable, monotonic order for cursor pagination.

CREATE TABLE files (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,
    id             TEXT    NOT NULL UNIQUE,
    purpose        TEXT    NOT NULL,
    -- the client's name for the file: metadata only, never used as a path
    filename       TEXT    NOT NULL,
    bytes          INTEGER NOT NULL,
    sha256         TEXT    NOT NULL,
    -- the server-generated blob key (e.g. files/file-….jsonl)
    storage_key    TEXT    NOT NULL,
    status         TEXT    NOT NULL CHECK (status IN ('uploaded', 'processed', 'error')),
    status_details TEXT,
    -- validation results: data format, example count, first errors (JSON array of strings)
    format         TEXT,
    examples       INTEGER,
    errors         TEXT,
    created_at     INTEGER NOT NULL
);
CREATE INDEX files_purpose_seq ON files (purpose, seq);

CREATE TABLE api_keys (
    id           TEXT    PRIMARY KEY,
    name         TEXT    NOT NULL,
    -- the first characters of the token, shown in listings; the token itself is never stored
    prefix       TEXT    NOT NULL,
    -- hex sha256 of the whole token: lookups are by hash
    token_sha256 TEXT    NOT NULL UNIQUE,
    created_at   INTEGER NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
);

-- One row per fine-tuning job; the row is both the API resource and the queue entry.
-- Files are referenced by id without a foreign key: a file may be deleted once no
-- queued or running job uses it, and finished jobs keep the id for the record.
CREATE TABLE jobs (
    seq                 INTEGER PRIMARY KEY AUTOINCREMENT,
    id                  TEXT    NOT NULL UNIQUE,
    api_key_id          TEXT    REFERENCES api_keys (id),
    model               TEXT    NOT NULL,
    training_file       TEXT    NOT NULL,
    validation_file     TEXT,
    suffix              TEXT,
    -- the full job spec (hyperparameters, LoRA settings) as JSON
    spec                TEXT    NOT NULL,
    status              TEXT    NOT NULL
                        CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    priority            INTEGER NOT NULL DEFAULT 0,
    -- earliest time a worker may claim it (retry back-off), unix ms
    run_at_ms           INTEGER NOT NULL,
    attempt             INTEGER NOT NULL DEFAULT 0,
    max_attempts        INTEGER NOT NULL DEFAULT 3,
    -- lease: who holds the job and until when (unix ms); renewed by heartbeats
    lease_owner         TEXT,
    lease_expires_at_ms INTEGER,
    heartbeat_at_ms     INTEGER,
    -- bumped on every claim; every write by a worker is conditioned on it, so a
    -- worker that lost its lease updates nothing
    fencing_token       INTEGER NOT NULL DEFAULT 0,
    cancel_requested_at INTEGER,
    idempotency_key     TEXT,
    progress            TEXT,
    error               TEXT,
    fine_tuned_model    TEXT,
    result              TEXT,
    created_at          INTEGER NOT NULL,
    started_at          INTEGER,
    finished_at         INTEGER
);
CREATE INDEX jobs_claim ON jobs (status, priority, run_at_ms, seq);
CREATE INDEX jobs_training_file ON jobs (training_file);
CREATE INDEX jobs_validation_file ON jobs (validation_file);
CREATE UNIQUE INDEX jobs_idempotency ON jobs (COALESCE(api_key_id, ''), idempotency_key)
    WHERE idempotency_key IS NOT NULL;

-- Job events; `id` is monotonic (AUTOINCREMENT never reuses ids) and is the SSE event id.
CREATE TABLE job_events (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id     TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt    INTEGER NOT NULL,
    level      TEXT    NOT NULL CHECK (level IN ('info', 'warn', 'error')),
    type       TEXT    NOT NULL CHECK (type IN ('message', 'metrics')),
    message    TEXT    NOT NULL,
    data       TEXT,
    created_at INTEGER NOT NULL
);
CREATE INDEX job_events_job ON job_events (job_id, id);

CREATE TABLE checkpoints (
    id          TEXT    PRIMARY KEY,
    job_id      TEXT    NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    attempt     INTEGER NOT NULL,
    step        INTEGER NOT NULL,
    storage_key TEXT    NOT NULL,
    metrics     TEXT,
    created_at  INTEGER NOT NULL,
    UNIQUE (job_id, step)
);
