//! A worker's folder for a job (`<data-dir>/jobs/<job id>/`): copies of the job's data
//! files, the trainer's output and its local checkpoints. Everything worth keeping is
//! published to the blob store, so the folder lives only as long as the job can still
//! run: a job that ended loses it, and so does a deleted file its every copy.

use std::path::{Path, PathBuf};

pub fn job_dir(data_dir: &Path, job_id: &str) -> PathBuf {
    data_dir.join("jobs").join(job_id)
}

/// Removes a job's folder (nothing when there is none).
pub async fn remove_job_dir(data_dir: &Path, job_id: &str) {
    let dir = job_dir(data_dir, job_id);
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(dir = %dir.display(), error = %e, "could not remove a job's folder")
        }
    }
}

/// Removes every local copy of a data file from the jobs' folders.
pub async fn remove_file_copies(data_dir: &Path, file_id: &str) {
    let Ok(mut jobs) = tokio::fs::read_dir(data_dir.join("jobs")).await else {
        return;
    };
    while let Ok(Some(job)) = jobs.next_entry().await {
        let copy = job.path().join(format!("{file_id}.jsonl"));
        if let Err(e) = tokio::fs::remove_file(&copy).await {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(file = %copy.display(), error = %e, "could not remove a file's copy");
            }
        }
    }
}

/// The job folders under `data_dir` (their job ids), for sweeping those of ended jobs.
pub async fn job_ids(data_dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    if let Ok(mut rd) = tokio::fs::read_dir(data_dir.join("jobs")).await {
        while let Ok(Some(e)) = rd.next_entry().await {
            if let Some(name) = e.file_name().to_str() {
                out.push(name.to_string());
            }
        }
    }
    out
}
