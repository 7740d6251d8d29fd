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
}

impl JobRecord {
    pub fn status(&self) -> Option<JobStatus> {
        JobStatus::parse(&self.status)
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
    pub priority: i64,
    pub max_attempts: i64,
    pub idempotency_key: Option<String>,
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
}
