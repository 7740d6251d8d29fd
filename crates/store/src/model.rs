//! Rows and the inputs that create them. Field types are the ones both backends
//! decode identically (`i64`, `String`, options of those); JSON stays text here and is
//! parsed by the layer that understands it.

use serde::{Deserialize, Serialize};

/// A stored upload (`files` table).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow, Serialize)]
pub struct FileRecord {
    pub id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: i64,
    pub sha256: String,
    pub storage_key: String,
    /// `processed` or `error` (`uploaded` is reserved for asynchronous validation).
    pub status: String,
    pub status_details: Option<String>,
    pub format: Option<String>,
    pub examples: Option<i64>,
    /// JSON array of the first validation errors.
    pub errors: Option<String>,
    pub created_at: i64,
    /// The API key that owns the file; `None` when it was made without one (a server
    /// without authentication, or the static admin key): then only admins see it.
    pub api_key_id: Option<String>,
}

/// Everything needed to insert a [`FileRecord`]; the id is chosen by the caller so
/// that the blob can be stored under it before the row exists.
pub type NewFile = FileRecord;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    Asc,
    #[default]
    Desc,
}

/// A cursor page request: items after the one with id `after`, in `order`.
#[derive(Debug, Clone, Default)]
pub struct ListFiles {
    pub after: Option<String>,
    pub limit: i64,
    pub order: Order,
    pub purpose: Option<String>,
    /// Only files of this API key (`None`: every file).
    pub owner: Option<String>,
}

/// One page of a cursor-paginated list.
#[derive(Debug, Clone)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

/// Job states. `queued` and `running` are the live ones: a file they reference
/// cannot be deleted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// A fine-tuning job (`jobs` table): the API resource and the queue entry in one row.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct JobRecord {
    pub id: String,
    pub api_key_id: Option<String>,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub spec: String,
    pub status: String,
    pub priority: i64,
    pub run_at_ms: i64,
    pub attempt: i64,
    pub max_attempts: i64,
    pub lease_owner: Option<String>,
    pub lease_expires_at_ms: Option<i64>,
    pub heartbeat_at_ms: Option<i64>,
    pub fencing_token: i64,
    pub cancel_requested_at: Option<i64>,
    pub idempotency_key: Option<String>,
    pub progress: Option<String>,
    pub error: Option<String>,
    pub fine_tuned_model: Option<String>,
    pub result: Option<String>,
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// The device kind the job must run on; `None`: any.
    pub device_kind: Option<String>,
    /// Set while the job is paused, or while a pause is asked of its worker (unix s).
    pub paused_at: Option<i64>,
    /// When its fine-tuned model was deleted (unix s): no longer listed or served.
    pub model_deleted_at: Option<i64>,
}

impl JobRecord {
    pub fn status(&self) -> Option<JobStatus> {
        JobStatus::parse(&self.status)
    }
}

/// A worker's hold on one attempt of a job, returned by [`Store::claim_next_job`](crate::Store::claim_next_job).
/// Every fenced write names it; the write happens only while `fencing_token` is still
/// the job's current one and the job is running, so a worker that lost its lease
/// (and may not know it yet) changes nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: String,
    pub worker_id: String,
    /// 1 for the first claim; counts towards `max_attempts`.
    pub attempt: i64,
    /// Bumped by every claim; the value fenced writes compare.
    pub fencing_token: i64,
    /// Unix ms, database clock.
    pub expires_at_ms: i64,
}

/// A job taken off the queue: the row as it is after the claim, and the lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClaimedJob {
    pub job: JobRecord,
    pub lease: Lease,
}

/// What a successful heartbeat reports back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Heartbeat {
    /// The renewed expiry, unix ms on the database clock.
    pub lease_expires_at_ms: i64,
    /// Set once a cancel was requested (unix s): the worker should stop at the next
    /// step and finish the job as cancelled. The heartbeat carries it so cancellation
    /// reaches workers on SQLite and remote workers alike, with no extra poll.
    pub cancel_requested_at: Option<i64>,
    /// Set once a pause was requested (unix s): the worker should checkpoint, stop, and
    /// hand the job back with `release_job(lease, true)`.
    pub pause_requested_at: Option<i64>,
}

/// How a worker ends an attempt with [`Store::finish_job`](crate::Store::finish_job).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded {
        fine_tuned_model: String,
        /// JSON: result file ids and the like.
        result: Option<String>,
    },
    /// `error` is JSON (the API's error object).
    Failed {
        error: String,
    },
    Cancelled,
}

impl JobOutcome {
    pub fn status(&self) -> JobStatus {
        match self {
            JobOutcome::Succeeded { .. } => JobStatus::Succeeded,
            JobOutcome::Failed { .. } => JobStatus::Failed,
            JobOutcome::Cancelled => JobStatus::Cancelled,
        }
    }
}

/// The caller-chosen parts of a new job; the rest starts at its defaults (`queued`,
/// attempt 0, no lease).
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub api_key_id: Option<String>,
    pub model: String,
    pub training_file: String,
    pub validation_file: Option<String>,
    pub suffix: Option<String>,
    pub spec: String,
    /// Claim order: lower values first, then older `run_at_ms`, then insertion order.
    pub priority: i64,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
    /// Only workers of this kind (`cpu`, `cuda`) may claim the job; `None`: any.
    pub device_kind: Option<String>,
}

/// A job event (`job_events`); `id` is monotonic and doubles as the SSE event id.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct EventRecord {
    pub id: i64,
    pub job_id: String,
    pub attempt: i64,
    pub level: String,
    #[sqlx(rename = "type")]
    pub kind: String,
    pub message: String,
    pub data: Option<String>,
    pub created_at: i64,
}

#[derive(Debug, Clone)]
pub struct NewEvent {
    pub job_id: String,
    pub attempt: i64,
    /// `info`, `warn` or `error`.
    pub level: String,
    /// `message` or `metrics`.
    pub kind: String,
    pub message: String,
    pub data: Option<String>,
}

/// A saved training checkpoint (`checkpoints`).
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct CheckpointRecord {
    pub id: String,
    pub job_id: String,
    pub attempt: i64,
    pub step: i64,
    pub storage_key: String,
    pub metrics: Option<String>,
    pub created_at: i64,
    /// Bytes it keeps in the blob store (0 when saved before this was recorded).
    pub bytes: i64,
}

/// An API key (`api_keys`): only the token's hash and a display prefix are stored.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub prefix: String,
    pub token_sha256: String,
    pub created_at: i64,
    pub last_used_at: Option<i64>,
    pub revoked_at: Option<i64>,
    /// An admin key sees (and may act on) every owner's files and jobs.
    pub admin: bool,
}

/// A worker as it last reported itself (`workers`): its device and that device's memory.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct WorkerRecord {
    pub id: String,
    /// `cpu`, `cuda:0`, …
    pub device: String,
    /// `cpu` or `cuda`, as jobs' `device_kind`.
    pub device_kind: String,
    pub total_bytes: i64,
    pub free_bytes: i64,
    pub seen_at_ms: i64,
}

/// A model made from a finished job's adapter (`exports`): queued, built by a worker,
/// then downloadable from `storage_key`.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct ExportRecord {
    pub id: String,
    pub job_id: String,
    /// `merged_safetensors` or `merged_gguf`.
    pub format: String,
    pub dtype: String,
    /// `queued`, `running`, `succeeded` or `failed`.
    pub status: String,
    pub error: Option<String>,
    pub storage_key: Option<String>,
    pub bytes: Option<i64>,
    pub sha256: Option<String>,
    pub worker_id: Option<String>,
    pub lease_expires_at_ms: Option<i64>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// Moved on by every claim: a worker holds the export while the token is its claim's.
    pub fencing_token: i64,
}

/// How a worker's export ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExportOutcome {
    Succeeded {
        storage_key: String,
        bytes: i64,
        sha256: String,
    },
    Failed {
        error: String,
    },
}
