//! The job domain, apart from HTTP: what a job's artifacts are called and contain. The
//! worker, inference and the API handlers all use it; it uses no axum.

pub mod artifacts;
pub mod export;
pub mod spec;
pub mod workdir;

pub use spec::{is_text_to_image, JobSpec, SpecError};

use loraforge_store::{JobRecord, JobStatus};

/// The status a client sees: the stored one, or `paused` for a queued job that a pause
/// holds back from the workers.
pub fn shown_status(job: &JobRecord) -> &str {
    if job.status() == Some(JobStatus::Queued) && job.paused_at.is_some() {
        "paused"
    } else {
        job.status.as_str()
    }
}

/// How a run's start names its packing: " (packed into 15 rows of 1024 tokens)", or
/// nothing when it does not pack.
pub fn packed_note(packed: Option<(usize, usize)>) -> String {
    packed
        .map(|(rows, len)| format!(" (packed into {rows} rows of {len} tokens)"))
        .unwrap_or_default()
}

/// The first `max` characters of `s` (all of it when shorter): how much of a client's
/// value a message may quote.
pub fn prefix(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        None => s,
        Some((at, _)) => &s[..at],
    }
}

/// [`prefix`], marked with `…` when it cut something.
pub fn cut(s: &str, max: usize) -> String {
    let p = prefix(s, max);
    if p.len() < s.len() {
        format!("{p}…")
    } else {
        s.to_string()
    }
}

/// How often a worker refreshes its row in `workers` (its device's memory).
pub const WORKER_REPORT_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

/// Workers seen within this long count as up, for admission and `GET /v1/workers`.
pub const WORKER_SEEN_WITHIN: std::time::Duration = std::time::Duration::from_secs(60);
