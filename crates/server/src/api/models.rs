//! `/v1/models`: the base models in the models directory, as the trainer sees them.

use super::{ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use axum::extract::{Path, State};
use axum::Json;
use loraforge_trainer::families::{self, ModelInfo};
use serde::Serialize;

/// OpenAI's model object plus what a fine-tuning client needs to choose a base.
#[derive(Debug, Serialize)]
pub struct ModelObject {
    pub id: String,
    pub object: &'static str,
    pub created: i64,
    pub owned_by: &'static str,
    pub format: String,
    pub architecture: String,
    pub parameters: u64,
    /// The stored type of most of its parameters (`bf16`, `q4_k`, ...).
    pub weights_dtype: Option<String>,
    /// About how much memory a default job takes to train it (batch 4 × 1,024 tokens,
    /// f32 on the CPU, the base as `base_dtype: auto` keeps it), in bytes.
    pub training_memory_bytes: Option<u64>,
    pub context_length: Option<u64>,
    pub trainable: bool,
    /// The tasks it can be fine-tuned for.
    pub tasks: Vec<String>,
    /// Why the model is not trainable, when it is not.
    pub note: Option<String>,
    /// For a fine-tuned model (`ft:...`): the base model its adapter applies to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// For a fine-tuned model: the job that trained it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fine_tuning_job_id: Option<String>,
}

pub fn model_object(m: &ModelInfo) -> ModelObject {
    let created = std::fs::metadata(&m.path)
        .and_then(|md| md.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let format = serde_json::to_value(m.format)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default();
    ModelObject {
        id: m.id.clone(),
        object: "model",
        created,
        owned_by: "loraforge",
        format,
        architecture: m.architecture.clone(),
        parameters: m.parameters,
        weights_dtype: m.weights_dtype.clone(),
        training_memory_bytes: m.training_memory_bytes,
        context_length: m.context_length,
        trainable: m.trainable,
        tasks: m.tasks.clone(),
        note: m.note.clone(),
        parent: None,
        fine_tuning_job_id: None,
    }
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// Scans the models directory on a blocking thread: it reads headers from disk.
pub async fn scan_infos(state: &AppState) -> ApiResult<Vec<ModelInfo>> {
    let dir = state.settings.models_dir.clone();
    tokio::task::spawn_blocking(move || families::scan(&dir))
        .await
        .map_err(ApiError::internal)
}

/// Base models, then the adapters of the caller's succeeded jobs as `ft:...` models.
async fn scan(state: &AppState, who: &Principal) -> ApiResult<Vec<ModelObject>> {
    let bases = scan_infos(state).await?;
    let mut out: Vec<ModelObject> = bases.iter().map(model_object).collect();
    let mut after: Option<String> = None;
    loop {
        let page = state
            .store
            .list_jobs_of(
                after.as_deref(),
                100,
                Some(loraforge_store::JobStatus::Succeeded),
                who.owner_filter(),
            )
            .await?;
        for j in &page.data {
            let Some(name) = j
                .fine_tuned_model
                .as_ref()
                .filter(|_| j.model_deleted_at.is_none())
            else {
                continue;
            };
            let base = bases.iter().find(|b| b.id == j.model);
            out.push(ModelObject {
                id: name.clone(),
                object: "model",
                created: j.finished_at.unwrap_or(j.created_at),
                owned_by: "loraforge",
                format: "lora".into(),
                architecture: base.map(|b| b.architecture.clone()).unwrap_or_default(),
                parameters: base.map(|b| b.parameters).unwrap_or(0),
                weights_dtype: None,
                training_memory_bytes: None,
                context_length: base.and_then(|b| b.context_length),
                trainable: false,
                tasks: Vec::new(),
                note: Some(format!(
                    "LoRA adapter of {}; download it from /v1/fine_tuning/jobs/{}/adapter",
                    j.model, j.id
                )),
                parent: Some(j.model.clone()),
                fine_tuning_job_id: Some(j.id.clone()),
            });
        }
        if !page.has_more {
            break;
        }
        after = page.data.last().map(|j| j.id.clone());
    }
    Ok(out)
}

/// `GET /v1/models`.
pub async fn list(State(state): State<AppState>, who: Principal) -> ApiResult<Json<ModelList>> {
    Ok(Json(ModelList {
        object: "list",
        data: scan(&state, &who).await?,
    }))
}

/// `GET /v1/models/{model}`.
pub async fn retrieve(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelObject>> {
    scan(&state, &who)
        .await?
        .into_iter()
        .find(|m| m.id == id)
        .map(Json)
        .ok_or_else(|| {
            ApiError::not_found(format!("The model `{id}` does not exist."))
                .param("model")
                .code("model_not_found")
        })
}

/// OpenAI's answer to `DELETE /v1/models/{model}`.
#[derive(Debug, Serialize)]
pub struct Deleted {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

/// `DELETE /v1/models/{model}`: a fine-tuned model (`ft:...` of the caller's job) stops
/// being listed and served. Its job, result files and checkpoints stay until deleted
/// themselves; base models are files in the models directory and are not deleted here.
pub async fn delete(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Deleted>> {
    let not_found = || {
        ApiError::not_found(format!("The model `{}` does not exist.", super::clip(&id)))
            .param("model")
            .code("model_not_found")
    };
    let Some(rest) = id.strip_prefix("ft:") else {
        let bases = scan_infos(&state).await?;
        if bases.iter().any(|b| b.id == id) {
            return Err(ApiError::bad_request(format!(
                "The model `{id}` is a base model: remove its file from the models directory \
                 to stop serving it."
            ))
            .param("model"));
        }
        return Err(not_found());
    };
    if rest.contains(":ckpt-step-") {
        return Err(ApiError::bad_request(
            "A checkpoint is deleted with its job's checkpoints, not as a model.",
        )
        .param("model"));
    }
    let job_id = rest
        .rsplit(':')
        .next()
        .filter(|j| j.starts_with("ftjob-"))
        .ok_or_else(not_found)?;
    let job = state
        .store
        .get_job_of(job_id, who.owner_filter())
        .await?
        .filter(|j| j.fine_tuned_model.as_deref() == Some(id.as_str()))
        .filter(|j| j.model_deleted_at.is_none())
        .ok_or_else(not_found)?;
    state
        .store
        .delete_fine_tuned_model(&job.id, who.owner_filter())
        .await?
        .ok_or_else(not_found)?;
    Ok(Json(Deleted {
        id,
        object: "model",
        deleted: true,
    }))
}
