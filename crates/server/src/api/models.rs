//! `/v1/models`: the base models in the models directory, as the trainer sees them.

use super::{ApiError, ApiResult};
use crate::app::AppState;
use axum::extract::{Path, State};
use axum::Json;
use loraforge_trainer::registry::{self, ModelInfo};
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
    pub context_length: Option<u64>,
    pub trainable: bool,
    /// Why the model is not trainable, when it is not.
    pub note: Option<String>,
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
        context_length: m.context_length,
        trainable: m.trainable,
        note: m.note.clone(),
    }
}

#[derive(Debug, Serialize)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelObject>,
}

/// Scans the directory on a blocking thread: it reads headers from disk.
async fn scan(state: &AppState) -> ApiResult<Vec<ModelObject>> {
    let dir = state.settings.models_dir.clone();
    tokio::task::spawn_blocking(move || registry::scan(&dir).iter().map(model_object).collect())
        .await
        .map_err(ApiError::internal)
}

/// `GET /v1/models`.
pub async fn list(State(state): State<AppState>) -> ApiResult<Json<ModelList>> {
    Ok(Json(ModelList {
        object: "list",
        data: scan(&state).await?,
    }))
}

/// `GET /v1/models/{model}`.
pub async fn retrieve(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> ApiResult<Json<ModelObject>> {
    scan(&state)
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
