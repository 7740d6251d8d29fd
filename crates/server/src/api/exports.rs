//! `/v1/fine_tuning/jobs/{id}/exports`: a finished decoder job's adapter merged into its
//! base, as a model of its own (an HF folder or a GGUF with an Ollama Modelfile, zipped),
//! built by a worker in the background and then downloaded like an adapter.

use super::jobs::{get_job, send_blob, Download};
use super::{ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::job::JobSpec;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_store::{ExportRecord, JobRecord, JobStatus, NewEvent};
use loraforge_trainer::families::decoder::export::MergedType;
use loraforge_trainer::train::Task;
use serde::Deserialize;
use serde_json::{json, Value};

/// The formats an export can have, and each one's tensor types (the default first).
pub const FORMATS: [(&str, &[&str]); 2] = [
    ("merged_safetensors", &["bf16", "f16", "f32"]),
    ("merged_gguf", &MergedType::NAMES),
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateExport {
    format: Option<String>,
    dtype: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct ExportPath {
    fine_tuning_job_id: String,
    export_id: String,
}

/// The download's file name: what it holds, from which job.
fn filename(e: &ExportRecord) -> String {
    let kind = e.format.trim_start_matches("merged_");
    format!("{}-merged-{kind}-{}.zip", e.job_id, e.dtype)
}

/// An export as the API shows it.
pub fn export_object(e: &ExportRecord) -> Value {
    json!({
        "object": "fine_tuning.job.export",
        "id": e.id,
        "fine_tuning_job_id": e.job_id,
        "format": e.format,
        "dtype": e.dtype,
        "status": e.status,
        "created_at": e.created_at,
        "finished_at": e.finished_at,
        "bytes": e.bytes,
        "sha256": e.sha256,
        "filename": filename(e),
        "error": e.error.as_deref().map(|m| json!({"message": m})),
    })
}

/// `POST /v1/fine_tuning/jobs/{id}/exports`: queues a merged export of the job's adapter
/// (201), or returns the same export already queued, running or done (200), so a retry
/// does not build it twice.
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let job = get_job(&state, &who, &id).await?;
    let body = super::json_body(&state, body).await?;
    let req: CreateExport = if body.iter().all(u8::is_ascii_whitespace) {
        CreateExport {
            format: None,
            dtype: None,
        }
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?
    };
    let format = req.format.as_deref().unwrap_or("merged_gguf");
    let Some((format, dtypes)) = FORMATS.iter().find(|(f, _)| *f == format) else {
        return Err(ApiError::bad_request(format!(
            "format must be one of {}",
            FORMATS.map(|(f, _)| f).join(", ")
        ))
        .param("format"));
    };
    let dtype = req.dtype.as_deref().unwrap_or(dtypes[0]);
    if !dtypes.contains(&dtype) {
        return Err(ApiError::bad_request(format!(
            "dtype of a {format} export must be one of {}",
            dtypes.join(", ")
        ))
        .param("dtype"));
    }
    check_exportable(&state, &job, format).await?;
    if let Some(same) = live_export(&state, &job.id, format, dtype).await? {
        return Ok(Json(export_object(&same)).into_response());
    }
    let e = ExportRecord {
        id: format!("ftexp-{}", uuid::Uuid::new_v4().simple()),
        job_id: job.id.clone(),
        format: format.to_string(),
        dtype: dtype.to_string(),
        status: "queued".into(),
        error: None,
        storage_key: None,
        bytes: None,
        sha256: None,
        worker_id: None,
        lease_expires_at_ms: None,
        created_at: loraforge_store::now_secs(),
        finished_at: None,
        fencing_token: 0,
    };
    // The same request, a moment earlier, may have queued it: then that one is the
    // answer. Should it fail or be deleted before it is read, this one is queued after all.
    let mut tries = 0;
    while !state.store.insert_export(&e).await? {
        if let Some(same) = live_export(&state, &job.id, format, dtype).await? {
            return Ok(Json(export_object(&same)).into_response());
        }
        tries += 1;
        if tries == 3 {
            return Err(ApiError::internal(
                "an equal export kept appearing and going; retry",
            ));
        }
    }
    let _ = state
        .store
        .append_event(&NewEvent {
            job_id: job.id.clone(),
            attempt: job.attempt,
            level: "info".into(),
            kind: "message".into(),
            message: format!("Export {} queued ({format}, {dtype})", e.id),
            data: Some(json!({"export_id": e.id, "status": "queued"}).to_string()),
        })
        .await;
    state.jobs_notify.notify_waiters();
    Ok((StatusCode::CREATED, Json(export_object(&e))).into_response())
}

/// The job's export of this format and dtype that has not failed, if it has one.
async fn live_export(
    state: &AppState,
    job_id: &str,
    format: &str,
    dtype: &str,
) -> ApiResult<Option<ExportRecord>> {
    Ok(state
        .store
        .list_exports(job_id)
        .await?
        .into_iter()
        .find(|e| e.format == format && e.dtype == dtype && e.status != "failed"))
}

/// Whether `job`'s adapter can be exported as `format`: a succeeded decoder job, and for
/// a GGUF a base that is a GGUF file (its tokenizer and hyperparameters are carried over).
async fn check_exportable(state: &AppState, job: &JobRecord, format: &str) -> ApiResult<()> {
    if job.status() != Some(JobStatus::Succeeded) {
        return Err(ApiError::conflict(format!(
            "Job {} has no adapter to export (status {}).",
            job.id, job.status
        ))
        .code("adapter_not_ready"));
    }
    if job.model_deleted_at.is_some() {
        return Err(ApiError::not_found(format!(
            "Job {}'s model {} was deleted: there is nothing to export.",
            job.id,
            job.fine_tuned_model.as_deref().unwrap_or_default()
        ))
        .code("model_not_found"));
    }
    let task = serde_json::from_str::<JobSpec>(&job.spec)
        .map(|s| s.task)
        .unwrap_or_default();
    if task != Task::CausalLm {
        return Err(ApiError::bad_request(format!(
            "Job {} is a {} job: exports merge a language model's adapter into its base.",
            job.id,
            task.as_str()
        ))
        .param("format")
        .code("export_not_supported"));
    }
    if format == "merged_gguf" {
        let base = super::models::scan_infos(state)
            .await?
            .into_iter()
            .find(|m| m.id == job.model);
        if let Some(m) = base.filter(|m| m.path.is_dir()) {
            return Err(ApiError::bad_request(format!(
                "Job {}'s base {} is an HF folder: a merged GGUF is made from a GGUF base \
                 (its tokenizer and hyperparameters are carried over). Export \
                 merged_safetensors and convert it with llama.cpp's convert_hf_to_gguf.py.",
                job.id, m.id
            ))
            .param("format")
            .code("export_not_supported"));
        }
    }
    Ok(())
}

/// `GET /v1/fine_tuning/jobs/{id}/exports`: the job's exports, newest first.
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = get_job(&state, &who, &id).await?;
    let data: Vec<Value> = state
        .store
        .list_exports(&job.id)
        .await?
        .iter()
        .map(export_object)
        .collect();
    Ok(Json(
        json!({"object": "list", "data": data, "has_more": false}),
    ))
}

async fn get_export(state: &AppState, who: &Principal, p: &ExportPath) -> ApiResult<ExportRecord> {
    let job = get_job(state, who, &p.fine_tuning_job_id).await?;
    state
        .store
        .get_export(&p.export_id)
        .await?
        .filter(|e| e.job_id == job.id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No such export {} of job {}",
                p.export_id, p.fine_tuning_job_id
            ))
            .param("export_id")
            .code("export_not_found")
        })
}

/// `GET /v1/fine_tuning/jobs/{id}/exports/{export_id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    who: Principal,
    Path(p): Path<ExportPath>,
) -> ApiResult<Json<Value>> {
    Ok(Json(export_object(&get_export(&state, &who, &p).await?)))
}

/// `GET /v1/fine_tuning/jobs/{id}/exports/{export_id}/content`: the zip, streamed with
/// an ETag and byte ranges, once the export has succeeded.
pub async fn content(
    State(state): State<AppState>,
    who: Principal,
    Path(p): Path<ExportPath>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let e = get_export(&state, &who, &p).await?;
    let (Some(key), "succeeded") = (e.storage_key.clone(), e.status.as_str()) else {
        return Err(ApiError::conflict(format!(
            "Export {} is {}: nothing to download yet.",
            e.id, e.status
        ))
        .code("export_not_ready"));
    };
    let download = Download {
        key,
        etag: e.sha256.as_deref().map(|s| format!("\"{s}\"")),
        filename: filename(&e),
        zip: true,
    };
    send_blob(&state, &headers, download).await
}

/// `DELETE /v1/fine_tuning/jobs/{id}/exports/{export_id}`: removes the export and its
/// file. One being built is removed too: its worker finds it gone and drops its work.
pub async fn delete(
    State(state): State<AppState>,
    who: Principal,
    Path(p): Path<ExportPath>,
) -> ApiResult<Json<Value>> {
    let e = get_export(&state, &who, &p).await?;
    let Some(e) = state.store.delete_export(&e.id).await? else {
        return Err(
            ApiError::not_found(format!("No such export {}", p.export_id))
                .param("export_id")
                .code("export_not_found"),
        );
    };
    if let Some(key) = &e.storage_key {
        if let Err(err) = state.blobs.delete(key).await {
            // The row is gone, so the export is deleted as far as anyone can see; the
            // orphan zip only costs space.
            tracing::warn!(key = %key, error = %err, "could not remove a deleted export's zip");
        }
    }
    Ok(Json(json!({
        "object": "fine_tuning.job.export.deleted",
        "id": e.id,
        "deleted": true,
    })))
}
