//! `GET /v1/workers`: the workers that are up, on which device, with how much memory:
//! what job admission compares a job's estimated memory against.

use super::ApiResult;
use crate::app::AppState;
use crate::auth::Principal;
use axum::extract::State;
use axum::Json;
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct WorkerObject {
    pub id: String,
    pub object: &'static str,
    /// `cpu`, `cuda:0`, …
    pub device: String,
    pub device_kind: String,
    pub memory_total_bytes: i64,
    pub memory_free_bytes: i64,
    /// When it last reported (Unix seconds).
    pub seen_at: i64,
}

#[derive(Debug, Serialize)]
pub struct WorkerList {
    pub object: &'static str,
    pub data: Vec<WorkerObject>,
}

/// `GET /v1/workers`: the workers seen within the last minute.
pub async fn list(State(state): State<AppState>, _who: Principal) -> ApiResult<Json<WorkerList>> {
    let data = state
        .store
        .live_workers(crate::job::WORKER_SEEN_WITHIN)
        .await?
        .into_iter()
        .map(|w| WorkerObject {
            id: w.id,
            object: "worker",
            device: w.device,
            device_kind: w.device_kind,
            memory_total_bytes: w.total_bytes,
            memory_free_bytes: w.free_bytes,
            seen_at: w.seen_at_ms / 1000,
        })
        .collect();
    Ok(Json(WorkerList {
        object: "list",
        data,
    }))
}
