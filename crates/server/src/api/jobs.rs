//! `/v1/fine_tuning/jobs`: OpenAI's fine-tuning job shapes, with LoRA settings as
//! extra keys of the `hyperparameters` object.

use super::{clip, ApiError, ApiQuery, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::job::artifacts::{
    adapter_key, adapter_zip, checkpoint_adapter_key, extra_files, fine_tuned_name, model_card,
    sha256_hex, ADAPTER_CONFIG, ADAPTER_TENSORS, LORA_GGUF_FILE,
};
use crate::job::spec::{parse_method, parse_spec, resolve_auto};
use crate::job::{is_text_to_image, shown_status, JobSpec};
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use loraforge_store::{CheckpointRecord, EventRecord, JobRecord, JobStatus, NewEvent, NewJob};
use loraforge_trainer::data::DataFormat;
use loraforge_trainer::families::encoder::model::ProblemType;
use loraforge_trainer::families::{for_task, JobCheck, ModelInfo, Named};
use loraforge_trainer::train::{Method, Task};
use loraforge_trainer::FAMILIES;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Deserialize)]
pub struct CreateJob {
    model: Option<String>,
    training_file: Option<String>,
    validation_file: Option<String>,
    hyperparameters: Option<Value>,
    method: Option<Value>,
    suffix: Option<String>,
    seed: Option<u64>,
    metadata: Option<Value>,
    /// OpenAI's reporting integrations (Weights & Biases): refused, there is no network
    /// to report to.
    integrations: Option<Value>,
    /// loraforge extension: `causal_lm` (default), or the task of another family
    /// (`sequence_classification`, `text_to_image`, `image_classification`,
    /// `speech_recognition`).
    task: Option<String>,
    /// loraforge extension, sequence classification only.
    problem_type: Option<String>,
    /// loraforge extension, speech recognition only: the clips' language code where
    /// the data names none.
    language: Option<String>,
}

fn bad_file(param: &'static str, msg: String) -> ApiError {
    ApiError::bad_request(msg).param(param).code("invalid_file")
}

/// A file the job may train on: the caller's own (another owner's reads as missing),
/// processed, for fine-tuning, and of a format that fits the task.
async fn check_file(
    state: &AppState,
    who: &Principal,
    id: &str,
    param: &'static str,
    task: Task,
) -> ApiResult<loraforge_store::FileRecord> {
    let f = state
        .store
        .get_file_of(id, who.owner_filter())
        .await?
        .ok_or_else(|| bad_file(param, format!("File {} not found.", clip(id))))?;
    if f.status != "processed" {
        return Err(bad_file(
            param,
            format!("File {id} is not processed (status {}).", f.status),
        ));
    }
    if f.purpose != "fine-tune" {
        return Err(bad_file(
            param,
            format!("File {id} has purpose {} (fine-tune expected).", f.purpose),
        ));
    }
    // A file trains the task of the family that takes its format.
    let format = f.format.as_deref().unwrap_or("unknown");
    let file_task = FAMILIES
        .iter()
        .find(|fam| fam.data_formats().iter().any(|d| d.as_str() == format))
        .map_or(Task::CausalLm, |fam| fam.task());
    if file_task != task {
        // A class folder named like kohya's `10_name` makes a zip read as captioned images.
        let hint = if format == DataFormat::ImageZip.as_str() && task == Task::ImageClassification {
            " An image-classification zip has one folder per class and no captions; folders \
             named like kohya's 10_name (a number, _, words) read as a text-to-image dataset."
        } else {
            ""
        };
        return Err(bad_file(
            param,
            format!(
                "File {id} has format {} and cannot train task {} (it fits task {}).{hint}",
                f.format.as_deref().unwrap_or("unknown"),
                task.as_str(),
                file_task.as_str()
            ),
        ));
    }
    Ok(f)
}

/// Largest file a family checks when the job is created; a bigger one is checked by the
/// worker, which fails the job with the same message.
const DATA_CHECK_MAX_BYTES: i64 = 64 << 20;

async fn blob_text(state: &AppState, f: &loraforge_store::FileRecord) -> ApiResult<String> {
    let bytes = state
        .blobs
        .read(&f.storage_key)
        .await
        .map_err(ApiError::internal)?;
    String::from_utf8(bytes).map_err(ApiError::internal)
}

/// The family's own checks of a job before it is queued (a classifier's label set, an
/// image run's resolution), given the files' text when the family reads data and the
/// files are small enough to read here.
async fn check_with_family(
    state: &AppState,
    info: &ModelInfo,
    spec: &JobSpec,
    train: &loraforge_store::FileRecord,
    valid: Option<&loraforge_store::FileRecord>,
) -> ApiResult<()> {
    let family = for_task(spec.task);
    if let Some(d) = spec.dtype.as_deref() {
        let d = loraforge_trainer::device::parse_dtype(d).map_err(ApiError::internal)?;
        family.check_dtype(d).map_err(|e| {
            let m = match e {
                loraforge_trainer::Error::Config(m) => m,
                e => e.to_string(),
            };
            ApiError::bad_request(format!("hyperparameters.{m}")).param("hyperparameters.dtype")
        })?;
    }
    if let Some(b) = spec.base_dtype.as_deref() {
        if !matches!(b, "auto" | "f32") && !family.packs_base() {
            return Err(ApiError::bad_request(format!(
                "hyperparameters.base_dtype {b}: {} models keep their base dense here (auto or f32)",
                family.name()
            ))
            .param("hyperparameters.base_dtype"));
        }
    }
    let small = train.bytes <= DATA_CHECK_MAX_BYTES
        && valid.is_none_or(|v| v.bytes <= DATA_CHECK_MAX_BYTES);
    let (t, v) = if family.checks_data() && small {
        let t = blob_text(state, train).await?;
        let v = match valid {
            Some(v) => Some(blob_text(state, v).await?),
            None => None,
        };
        (Some(t), v)
    } else {
        (None, None)
    };
    let names = (
        format!("training_file {}", train.id),
        valid.map(|v| format!("validation_file {}", v.id)),
    );
    let own = serde_json::to_value(spec).map_err(ApiError::internal)?;
    let (id, model) = (info.id.clone(), info.path.clone());
    let has_validation = valid.is_some();
    tokio::task::spawn_blocking(move || {
        family.check_job(&JobCheck {
            model_id: &id,
            model: &model,
            spec: &own,
            training: t.as_deref().map(|text| Named {
                name: &names.0,
                text,
            }),
            validation: names
                .1
                .as_deref()
                .zip(v.as_deref())
                .map(|(name, text)| Named { name, text }),
            has_validation,
        })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::from)
}

/// Refuses a job that no live worker could hold: its estimated memory (frozen weights in
/// the precision it would run in on that worker's device, plus a step's activations)
/// against each worker's device memory. With no worker reporting (none started yet, or
/// a family that cannot estimate), the job is admitted unchecked.
async fn check_memory(
    state: &AppState,
    info: &ModelInfo,
    spec: &JobSpec,
    device_kind: Option<&str>,
) -> ApiResult<()> {
    let workers: Vec<_> = state
        .store
        .live_workers(crate::job::WORKER_SEEN_WITHIN)
        .await?
        .into_iter()
        .filter(|w| device_kind.is_none_or(|k| w.device_kind == k))
        .collect();
    if workers.is_empty() {
        return Ok(());
    }
    let family = for_task(spec.task);
    let own = serde_json::to_value(spec).map_err(ApiError::internal)?;
    let dtype = spec
        .dtype
        .as_deref()
        .map(loraforge_trainer::device::parse_dtype)
        .transpose()
        .map_err(ApiError::internal)?;
    let path = info.path.clone();
    let needs = tokio::task::spawn_blocking(move || {
        workers
            .into_iter()
            .map(|w| {
                let d = dtype.unwrap_or_else(|| family.default_dtype(w.device_kind == "cuda"));
                (family.estimate_memory(&path, &own, d), d, w)
            })
            .collect::<Vec<_>>()
    })
    .await
    .map_err(ApiError::internal)?;
    if needs.iter().any(|(est, _, w)| {
        est.is_none_or(|e| e.total() <= u64::try_from(w.total_bytes).unwrap_or(0))
    }) {
        return Ok(());
    }
    let (est, d, w) = needs
        .iter()
        .max_by_key(|(_, _, w)| w.total_bytes)
        .expect("at least one worker");
    let est = est.expect("every estimate is known here");
    let gib = |b: u64| b as f64 / (1u64 << 30) as f64;
    Err(ApiError::bad_request(format!(
        "This job needs about {:.1} GiB in {} ({:.1} GiB of frozen weights and {:.1} GiB of \
         activations for batch_size {} x max_seq_len {}), more than any worker's device holds: \
         the largest, {} of worker {}, has {:.1} GiB. Lower batch_size or max_seq_len.",
        gib(est.total()),
        loraforge_trainer::device::dtype_name(*d),
        gib(est.weights),
        gib(est.activations),
        spec.batch_size,
        spec.max_seq_len,
        w.device,
        w.id,
        gib(u64::try_from(w.total_bytes).unwrap_or(0)),
    ))
    .param("hyperparameters.batch_size")
    .code("insufficient_device_memory"))
}

/// The job an `Idempotency-Key` already made, if this request is the one that made it;
/// a key reused for another request is a 409 (jobs made before requests were recorded
/// are returned as they are).
fn same_request(job: JobRecord, fingerprint: Option<&str>) -> ApiResult<Json<Value>> {
    let recorded = serde_json::from_str::<JobSpec>(&job.spec)
        .ok()
        .and_then(|s| s.request_sha256);
    match recorded {
        Some(r) if Some(r.as_str()) != fingerprint => Err(ApiError::conflict(format!(
            "This Idempotency-Key was used for another request (job {}); use a new key for a new job.",
            job.id
        ))
        .code("idempotency_key_reused")),
        _ => Ok(Json(job_object(&job))),
    }
}

/// OpenAI's limits on `metadata`: an object of at most 16 values, keys of at most 64
/// characters, values of at most 512. OpenAI's values are strings; numbers and booleans
/// are kept as they come (clients send them), anything else is refused.
fn check_metadata(m: &Value) -> ApiResult<()> {
    let bad = |what: &str| Err(ApiError::bad_request(format!("metadata {what}")).param("metadata"));
    let Some(map) = m.as_object() else {
        return if m.is_null() {
            Ok(())
        } else {
            bad("must be an object")
        };
    };
    if map.len() > 16 {
        return bad("may hold at most 16 keys");
    }
    for (k, v) in map {
        if k.chars().count() > 64 {
            return bad(&format!("key {} is longer than 64 characters", clip(k)));
        }
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(_) | Value::Bool(_) => v.to_string(),
            _ => {
                return bad(&format!(
                    "value of {} must be a string, a number or a boolean",
                    clip(k)
                ))
            }
        };
        if text.chars().count() > 512 {
            return bad(&format!(
                "value of {} is longer than 512 characters",
                clip(k)
            ));
        }
    }
    Ok(())
}

/// `POST /v1/fine_tuning/jobs`.
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    headers: HeaderMap,
    body: axum::body::Body,
) -> ApiResult<Json<Value>> {
    let body = super::json_body(&state, body).await?;
    let req: CreateJob = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))?;
    let idem = match headers.get("idempotency-key") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .map(str::trim)
                .filter(|k| !k.is_empty() && k.len() <= 255)
                .ok_or_else(|| {
                    ApiError::bad_request(
                        "Idempotency-Key must be 1 to 255 visible ASCII characters.",
                    )
                    .code("invalid_idempotency_key")
                })?
                .to_string(),
        ),
    };
    // What a retry must repeat: the request, as JSON (key order and spacing aside).
    // Only a request with a key can be retried, so only it is fingerprinted.
    let fingerprint = match &idem {
        Some(_) => Some(
            serde_json::from_slice::<Value>(&body)
                .map(|v| crate::job::artifacts::sha256_hex(v.to_string().as_bytes()))
                .map_err(ApiError::internal)?,
        ),
        None => None,
    };
    if let Some(key) = &idem {
        if let Some(j) = state
            .store
            .find_job_by_idempotency_key(who.owner_id(), key)
            .await?
        {
            return same_request(j, fingerprint.as_deref());
        }
    }
    let (method, hp) = parse_method(req.method.as_ref(), req.hyperparameters.as_ref())?;
    if req
        .integrations
        .as_ref()
        .is_some_and(|i| !i.is_null() && i.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(ApiError::bad_request(
            "integrations are not supported: loraforge reports to no outside service; \
             follow a job with its events, its SSE stream or its checkpoints' metrics",
        )
        .param("integrations"));
    }
    let model = req
        .model
        .ok_or_else(|| ApiError::bad_request("model is required").param("model"))?;
    let info = super::models::scan_infos(&state)
        .await?
        .into_iter()
        .find(|m| m.id == model)
        .ok_or_else(|| {
            ApiError::bad_request(format!(
                "Model {} does not exist (see GET /v1/models).",
                clip(&model)
            ))
            .param("model")
            .code("model_not_found")
        })?;
    if !info.trainable {
        return Err(ApiError::bad_request(format!(
            "Model {model} is not trainable: {}",
            info.note.unwrap_or_default()
        ))
        .param("model"));
    }
    let task = match req.task.as_deref() {
        None => Task::CausalLm,
        Some(t) => Task::parse(t).map_err(|_| {
            ApiError::bad_request(format!(
                "task {} is not one of causal_lm, sequence_classification, text_to_image, image_classification, speech_recognition",
                clip(t)
            ))
            .param("task")
        })?,
    };
    if !info.tasks.iter().any(|t| t == task.as_str()) {
        return Err(ApiError::bad_request(format!(
            "Model {model} ({}) cannot be trained for task {}; its tasks: {}.",
            info.architecture,
            task.as_str(),
            info.tasks.join(", ")
        ))
        .param("task"));
    }
    let problem_type = match (&req.problem_type, task) {
        (None, _) => None,
        (Some(p), Task::SequenceClassification) => Some(ProblemType::parse(p).map_err(|e| {
            ApiError::bad_request(e.to_string().trim_start_matches("config: ").to_string())
                .param("problem_type")
        })?),
        (Some(_), _) => {
            return Err(ApiError::bad_request(
                "problem_type applies to task sequence_classification only",
            )
            .param("problem_type"))
        }
    };
    let language = match (req.language.as_deref(), task) {
        (None, _) => None,
        (Some(l), Task::SpeechRecognition) => Some(l.trim().to_string()),
        (Some(_), _) => {
            return Err(
                ApiError::bad_request("language applies to task speech_recognition only")
                    .param("language"),
            )
        }
    };
    let training_file = req
        .training_file
        .ok_or_else(|| ApiError::bad_request("training_file is required").param("training_file"))?;
    let train_rec = check_file(&state, &who, &training_file, "training_file", task).await?;
    let valid_rec = match &req.validation_file {
        Some(v) => Some(check_file(&state, &who, v, "validation_file", task).await?),
        None => None,
    };
    if method != Method::Supervised && task != Task::CausalLm {
        return Err(ApiError::bad_request(format!(
            "method {} trains task causal_lm only",
            method.name()
        ))
        .param("method"));
    }
    for (param, rec) in [
        ("training_file", Some(&train_rec)),
        ("validation_file", valid_rec.as_ref()),
    ] {
        let Some(rec) = rec else { continue };
        let pairs = rec.format.as_deref() == Some(DataFormat::Preference.as_str());
        match (method, pairs) {
            (Method::Dpo { .. }, false) => {
                return Err(bad_file(
                    param,
                    format!(
                        "File {} has format {}; method dpo trains on preference pairs \
                         (input, preferred_output, non_preferred_output).",
                        rec.id,
                        rec.format.as_deref().unwrap_or("unknown")
                    ),
                ))
            }
            (Method::Supervised, true) => {
                return Err(bad_file(
                    param,
                    format!(
                        "File {} holds preference pairs: train it with method \
                         {{\"type\": \"dpo\"}}.",
                        rec.id
                    ),
                ))
            }
            _ => {}
        }
    }
    if let Some(m) = &req.metadata {
        check_metadata(m)?;
    }
    let mut spec = parse_spec(&hp, req.seed, req.metadata, task, method)?;
    if hp
        .get("lora_target_modules")
        .is_none_or(serde_json::Value::is_null)
    {
        // The usual set for this model's layout (fused projections name other modules).
        spec.lora_target_modules = for_task(task).default_targets_for(&info.path).to_list();
    }
    resolve_auto(
        &mut spec,
        &hp,
        train_rec.examples.unwrap_or(0).max(0) as u64,
    );
    spec.request_sha256 = fingerprint.clone();
    spec.problem_type = problem_type.map(|p| p.as_str().to_string());
    spec.language = language;
    check_with_family(&state, &info, &spec, &train_rec, valid_rec.as_ref()).await?;
    if let Some(s) = &req.suffix {
        if s.len() > 64
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ApiError::bad_request(
                "suffix must be at most 64 characters of [A-Za-z0-9_-]",
            )
            .param("suffix"));
        }
        // `ft:<model>:ckpt-step-5:<job>` would read as a checkpoint of a model that is not.
        if s.starts_with("ckpt-step-") {
            return Err(ApiError::bad_request(
                "suffix must not start with ckpt-step-: names ending in :ckpt-step-N are checkpoints",
            )
            .param("suffix"));
        }
    }
    // A big SD pipeline on a CPU worker would take a day: such jobs wait for CUDA.
    let device_kind = (task == Task::TextToImage
        && info.parameters > state.settings.cpu_image_max_params)
        .then(|| "cuda".to_string());
    check_memory(&state, &info, &spec, device_kind.as_deref()).await?;
    let id = format!("ftjob-{}", uuid::Uuid::new_v4().simple());
    let new = NewJob {
        id: id.clone(),
        api_key_id: who.owner_id().map(str::to_string),
        model,
        training_file,
        validation_file: req.validation_file,
        suffix: req.suffix,
        spec: serde_json::to_string(&spec).map_err(ApiError::internal)?,
        priority: 0,
        max_attempts: 3,
        idempotency_key: idem.clone(),
        device_kind: device_kind.clone(),
    };
    let cap = state.settings.max_active_jobs_per_owner;
    let job = match state.store.insert_job_within(&new, cap).await {
        Ok(j) => j,
        Err(loraforge_store::Error::OverLimit { used }) => {
            return Err(ApiError::new(
                axum::http::StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "This key already has {used} queued or running jobs, the most allowed \
                     (--max-active-jobs-per-owner {cap}); wait for one to finish or cancel one."
                ),
            )
            .code("too_many_active_jobs"))
        }
        Err(loraforge_store::Error::Invalid(m)) => {
            // A data file deleted while the job was being created.
            return Err(bad_file("training_file", m));
        }
        // A concurrent retry with the same key won the insert: answer with its job, whose
        // creation that request has already recorded.
        Err(e) => {
            return match &idem {
                Some(key) => {
                    let j = state
                        .store
                        .find_job_by_idempotency_key(who.owner_id(), key)
                        .await?
                        .ok_or_else(|| ApiError::from(e))?;
                    same_request(j, fingerprint.as_deref())
                }
                None => Err(e.into()),
            }
        }
    };
    state
        .store
        .append_event(&NewEvent {
            job_id: job.id.clone(),
            attempt: 0,
            level: "info".into(),
            kind: "message".into(),
            message: match &device_kind {
                Some(k) => format!(
                    "Created fine-tuning job: {}; it waits for a {k} worker ({} has {} parameters, \
                     more than CPU workers take: --cpu-image-max-params {})",
                    job.id, job.model, info.parameters, state.settings.cpu_image_max_params
                ),
                None => format!("Created fine-tuning job: {}", job.id),
            },
            data: None,
        })
        .await?;
    state.jobs_notify.notify_waiters();
    Ok(Json(job_object(&job)))
}

fn parse_json(s: &Option<String>) -> Value {
    s.as_deref()
        .and_then(|t| serde_json::from_str(t).ok())
        .unwrap_or(Value::Null)
}

/// OpenAI's `method`: its type, and the hyperparameters under the type's name (DPO's
/// with its `beta`).
fn method_object(method: Method, mut hp: Value) -> Value {
    if let Method::Dpo { beta } = method {
        hp["beta"] = json!(beta);
    }
    let mut m = json!({"type": method.name()});
    m[method.name()] = json!({"hyperparameters": hp});
    m
}

/// The OpenAI `fine_tuning.job` object, plus `progress`.
pub fn job_object(j: &JobRecord) -> Value {
    let spec: Option<JobSpec> = serde_json::from_str(&j.spec).ok();
    let progress = parse_json(&j.progress);
    let result = parse_json(&j.result);
    let hp = spec.as_ref().map(|s| {
        let mut h = json!({
            "n_epochs": s.n_epochs,
            "batch_size": s.batch_size,
            "learning_rate_multiplier": s.learning_rate_multiplier,
            "learning_rate": s.learning_rate,
            "lora_r": s.lora_r,
            "lora_alpha": s.lora_alpha,
            "lora_dropout": s.lora_dropout,
            "lora_target_modules": if s.lora_target_modules == "all-linear" { json!("all-linear") } else { json!(s.lora_target_modules.split(',').collect::<Vec<_>>()) },
            "use_rslora": s.use_rslora,
            "lr_scheduler": s.lr_scheduler,
            "warmup_ratio": s.warmup_ratio,
            "weight_decay": s.weight_decay,
            "max_grad_norm": s.max_grad_norm,
            "gradient_accumulation_steps": s.gradient_accumulation_steps,
            "max_seq_len": s.max_seq_len,
            "max_steps": s.max_steps,
            "train_on_inputs": s.train_on_inputs,
            "gradient_checkpointing": s.gradient_checkpointing,
            "packing": s.packing,
            "eval_interval": s.eval_interval,
            "checkpoint_interval": s.checkpoint_interval,
            "keep_checkpoints": s.keep_checkpoints,
            "dtype": s.dtype,
            "base_dtype": s.base_dtype,
        });
        if s.task == Task::TextToImage {
            h["resolution"] = json!(s.resolution);
            h["snr_gamma"] = json!(s.snr_gamma);
            h["noise_offset"] = json!(s.noise_offset);
            h["prediction_type"] = json!(s.prediction_type);
        }
        h
    });
    let eta = progress.get("eta_seconds").and_then(|v| v.as_f64());
    let estimated_finish = match (j.status(), eta) {
        (Some(JobStatus::Running), Some(s)) => json!(loraforge_store::now_secs() + s.ceil() as i64),
        _ => Value::Null,
    };
    json!({
        "object": "fine_tuning.job",
        "id": j.id,
        "model": j.model,
        "task": spec.as_ref().map(|s| s.task.as_str()).unwrap_or("causal_lm"),
        "problem_type": spec.as_ref().and_then(|s| s.problem_type.clone()),
        "language": spec.as_ref().and_then(|s| s.language.clone()),
        "created_at": j.created_at,
        "finished_at": j.finished_at,
        "fine_tuned_model": j.fine_tuned_model,
        "organization_id": "org-loraforge",
        "result_files": result.get("result_files").cloned().unwrap_or(json!([])),
        "status": shown_status(j),
        "validation_file": j.validation_file,
        "training_file": j.training_file,
        "hyperparameters": hp.clone().unwrap_or(json!({})),
        "method": method_object(spec.as_ref().map(|s| s.method).unwrap_or_default(), hp.unwrap_or(json!({}))),
        "trained_tokens": progress.get("tokens").cloned().unwrap_or(Value::Null),
        "error": parse_json(&j.error),
        "seed": spec.as_ref().map(|s| s.seed),
        "estimated_finish": estimated_finish,
        "integrations": [],
        "metadata": spec.as_ref().and_then(|s| s.metadata.clone()),
        "user_provided_suffix": j.suffix,
        "device_kind": j.device_kind,
        "progress": if progress.is_null() { Value::Null } else { progress },
        "adapter_formats": adapter_formats(&result),
    })
}

/// The download formats a job's adapter has: those whose hash its result records.
fn adapter_formats(result: &Value) -> Vec<&str> {
    ["zip", "safetensors", "kohya", "gguf"]
        .into_iter()
        .filter(|f| result.pointer(&format!("/adapter_sha256/{f}")).is_some())
        .collect()
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    after: Option<String>,
    limit: Option<i64>,
    status: Option<String>,
}

/// `GET /v1/fine_tuning/jobs`; `metadata[key]=value` parameters (OpenAI's filter) keep
/// only jobs whose metadata has every one of those values.
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(q): ApiQuery<ListParams>,
    axum::extract::RawQuery(raw): axum::extract::RawQuery,
) -> ApiResult<Json<Value>> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 100").param("limit"));
    }
    let status = match &q.status {
        None => None,
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!("unknown status {}", clip(s))).param("status")
        })?),
    };
    let pairs: Vec<(String, String)> = serde_urlencoded::from_str(raw.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request(format!("Invalid query string: {e}")))?;
    let wanted: Vec<(String, String)> = pairs
        .into_iter()
        .filter_map(|(k, v)| {
            let key = k.strip_prefix("metadata[")?.strip_suffix(']')?.to_string();
            Some((key, v))
        })
        .collect();
    let matches = |j: &JobRecord| {
        let spec: Option<JobSpec> = serde_json::from_str(&j.spec).ok();
        let meta = spec.and_then(|s| s.metadata).unwrap_or(Value::Null);
        wanted.iter().all(|(k, v)| match meta.get(k) {
            Some(Value::String(s)) => s == v,
            // Numbers and booleans compare as the JSON the query value spells.
            Some(other) if !other.is_null() => {
                serde_json::from_str::<Value>(v).ok().as_ref() == Some(other)
            }
            _ => false,
        })
    };
    // Without a metadata filter a page is a page; with one, pages are read until
    // `limit` jobs match (and one more, to know whether there are more).
    let mut data: Vec<JobRecord> = Vec::new();
    let mut after = q.after.clone();
    let mut has_more = false;
    loop {
        let page = state
            .store
            .list_jobs_of(
                after.as_deref(),
                if wanted.is_empty() { limit } else { 100 },
                status,
                who.owner_filter(),
            )
            .await?;
        after = page.data.last().map(|j| j.id.clone());
        for j in page.data {
            if matches(&j) {
                if data.len() as i64 == limit {
                    has_more = true;
                    break;
                }
                data.push(j);
            }
        }
        if wanted.is_empty() {
            has_more = page.has_more;
            break;
        }
        if has_more || !page.has_more {
            break;
        }
    }
    Ok(Json(json!({
        "object": "list",
        "data": data.iter().map(job_object).collect::<Vec<_>>(),
        "has_more": has_more,
    })))
}

/// The job if the caller may see it; another owner's job is the same 404 as none.
pub(super) async fn get_job(state: &AppState, who: &Principal, id: &str) -> ApiResult<JobRecord> {
    state
        .store
        .get_job_of(id, who.owner_filter())
        .await?
        .ok_or_else(|| {
            ApiError::not_found(format!("No such fine-tuning job: {id}"))
                .param("fine_tuning_job_id")
                .code("job_not_found")
        })
}

/// `GET /v1/fine_tuning/jobs/{id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(job_object(&get_job(&state, &who, &id).await?)))
}

/// `POST /v1/fine_tuning/jobs/{id}/cancel`.
pub async fn cancel(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let before = get_job(&state, &who, &id).await?;
    if before.status().is_some_and(|s| s.is_terminal()) {
        return Err(
            ApiError::bad_request(format!("Job {id} has already {}.", before.status))
                .code("job_not_cancellable"),
        );
    }
    let job = state.store.request_cancel(&id).await?;
    state.job_control.send_modify(|n| *n += 1);
    // A queued job is cancelled at once: its streams end now, not at the next poll.
    state.feeds.wake(&id);
    if job.status() == Some(JobStatus::Cancelled) {
        note(&state, &job, "Job cancelled before it started.").await?;
    }
    Ok(Json(job_object(&job)))
}

async fn note(state: &AppState, job: &JobRecord, message: &str) -> ApiResult<()> {
    state
        .store
        .append_event(&NewEvent {
            job_id: job.id.clone(),
            attempt: job.attempt,
            level: "info".into(),
            kind: "message".into(),
            message: message.into(),
            data: None,
        })
        .await?;
    state.feeds.wake(&job.id);
    Ok(())
}

/// `POST /v1/fine_tuning/jobs/{id}/pause`: a running job checkpoints at its current
/// step and stops; a queued one is held. Either way no worker takes it until resumed.
pub async fn pause(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let before = get_job(&state, &who, &id).await?;
    if before.status().is_some_and(|s| s.is_terminal()) {
        return Err(
            ApiError::bad_request(format!("Job {id} has already {}.", before.status))
                .code("job_not_pausable"),
        );
    }
    let job = state.store.request_pause(&id).await?;
    state.job_control.send_modify(|n| *n += 1);
    if before.paused_at.is_none() {
        note(
            &state,
            &job,
            if job.status() == Some(JobStatus::Running) {
                "Pause requested"
            } else {
                "Job paused"
            },
        )
        .await?;
    }
    Ok(Json(job_object(&job)))
}

/// `POST /v1/fine_tuning/jobs/{id}/resume`: a paused job is queued again and continues
/// from the checkpoint it paused at.
pub async fn resume(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let before = get_job(&state, &who, &id).await?;
    if before.paused_at.is_none() {
        return Err(
            ApiError::bad_request(format!("Job {id} is not paused.")).code("job_not_paused")
        );
    }
    let job = state.store.resume_job(&id).await?;
    note(&state, &job, "Job resumed").await?;
    state.jobs_notify.notify_waiters();
    Ok(Json(job_object(&job)))
}

/// The OpenAI `fine_tuning.job.event` object.
pub fn event_object(e: &EventRecord) -> Value {
    json!({
        "object": "fine_tuning.job.event",
        "id": format!("ftevent-{}", e.id),
        "created_at": e.created_at,
        "level": e.level,
        "message": e.message,
        "data": parse_json(&e.data),
        "type": e.kind,
    })
}

#[derive(Debug, Deserialize)]
pub struct EventParams {
    after: Option<String>,
    limit: Option<i64>,
    stream: Option<bool>,
}

fn event_seq(id: &str) -> Option<i64> {
    id.strip_prefix("ftevent-").unwrap_or(id).parse().ok()
}

/// `GET /v1/fine_tuning/jobs/{id}/events`: OpenAI's list (newest first), or with
/// `?stream=true` / `Accept: text/event-stream` a Server-Sent Events stream that
/// replays what follows `Last-Event-ID`, then follows live, then ends with `done`.
pub async fn events(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<EventParams>,
) -> ApiResult<Response> {
    get_job(&state, &who, &id).await?;
    let wants_sse = q.stream.unwrap_or(false)
        || headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/event-stream"));
    if wants_sse {
        let asked = headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .and_then(event_seq)
            .unwrap_or(0);
        // An id past this job's newest event (a typo, another job's id, a hostile
        // client) means "from now on", not "from a position that never comes".
        let newest = state.store.last_event_id(&id).await?;
        return Ok(sse(state, id, asked.clamp(0, newest), newest, who.key_id)
            .await
            .into_response());
    }
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request("limit must be between 1 and 1000").param("limit"));
    }
    // Newest first, one page (and one more row, to know whether more follow) read
    // from the database.
    let before = q.after.as_deref().and_then(event_seq);
    let mut newest = state
        .store
        .list_events_newest(&id, before, limit + 1)
        .await?;
    let has_more = newest.len() as i64 > limit;
    newest.truncate(limit as usize);
    Ok(Json(json!({
        "object": "list",
        "data": newest.iter().map(event_object).collect::<Vec<_>>(),
        "has_more": has_more,
    }))
    .into_response())
}

/// How often an open stream checks that the key that opened it is not revoked.
const KEY_CHECK: Duration = Duration::from_secs(2);

/// A job's event stream for a follower at `last`; the job's newest event was `newest`.
/// A stream opened with a database key ends within two [`KEY_CHECK`]s of that key's revocation
/// (the liveness read is shared by the key's streams and at most one `KEY_CHECK` old).
async fn sse(
    state: AppState,
    job_id: String,
    last: i64,
    newest: i64,
    key_id: Option<String>,
) -> impl IntoResponse {
    struct S {
        key_id: Option<String>,
        key_checked: tokio::time::Instant,
        state: AppState,
        job_id: String,
        /// Held for the stream's life: the job's poller runs while anyone follows it.
        _feed: Arc<crate::feeds::Feed>,
        rx: tokio::sync::watch::Receiver<crate::feeds::Snapshot>,
        last: i64,
        finished: bool,
    }
    let feed = state.feeds.follow(&state, &job_id, newest);
    let init = S {
        key_id,
        key_checked: tokio::time::Instant::now(),
        rx: feed.subscribe(),
        _feed: feed,
        state,
        job_id,
        last,
        finished: false,
    };
    let stream = futures::stream::unfold(init, |mut s| async move {
        if s.finished || s.state.shutdown.is_cancelled() {
            return None;
        }
        loop {
            if let Some(k) = &s.key_id {
                if s.key_checked.elapsed() >= KEY_CHECK {
                    s.key_checked = tokio::time::Instant::now();
                    // A revoked key's stream ends (a database error keeps it open).
                    if !s.state.auth.key_is_live(&s.state.store, k, KEY_CHECK).await {
                        return None;
                    }
                }
            }
            let snap = s.rx.borrow_and_update().clone();
            // From the feed's memory, or (a replay, or far behind) from the database.
            let batch = match snap.after(s.last) {
                Some(b) => b,
                None => match s
                    .state
                    .store
                    .list_events(&s.job_id, Some(s.last), 500)
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        tracing::warn!(error = %e, "event stream: database read failed");
                        tokio::time::sleep(crate::feeds::POLL).await;
                        continue;
                    }
                },
            };
            if !batch.is_empty() {
                s.last = batch.last().map(|e| e.id).unwrap_or(s.last);
                let events: Vec<Result<Event, std::convert::Infallible>> = batch
                    .iter()
                    .map(|e| {
                        Ok(Event::default()
                            .id(e.id.to_string())
                            .event(e.kind.clone())
                            .data(event_object(e).to_string()))
                    })
                    .collect();
                return Some((futures::stream::iter(events), s));
            }
            // Finished and nothing after our position, in the feed or in the database:
            // the stream is complete, wherever the feed itself started.
            if snap.finished {
                s.finished = true;
                let done = vec![Ok(Event::default().event("done").data("[DONE]"))];
                return Some((futures::stream::iter(done), s));
            }
            // On shutdown the stream ends (without `done`): clients reconnect elsewhere
            // with Last-Event-ID, and the server's graceful stop is not held open.
            tokio::select! {
                changed = s.rx.changed() => {
                    if changed.is_err() && !s.rx.borrow().finished {
                        // The poller stopped without finishing (shutdown): so does the stream.
                        return None;
                    }
                }
                _ = tokio::time::sleep(KEY_CHECK), if s.key_id.is_some() => {}
                _ = s.state.shutdown.cancelled() => return None,
            }
        }
    })
    .flatten();
    let mut resp = Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response();
    resp.headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// The OpenAI `fine_tuning.job.checkpoint` object.
pub fn checkpoint_object(job: &JobRecord, c: &CheckpointRecord) -> Value {
    json!({
        "object": "fine_tuning.job.checkpoint",
        "id": c.id,
        "created_at": c.created_at,
        "fine_tuned_model_checkpoint": format!("{}:ckpt-step-{}", fine_tuned_name(job), c.step),
        "fine_tuning_job_id": c.job_id,
        "metrics": parse_json(&c.metrics),
        "step_number": c.step,
    })
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints`, newest first.
pub async fn checkpoints(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<Value>> {
    let job = get_job(&state, &who, &id).await?;
    let list = state.store.list_checkpoints(&id).await?;
    Ok(Json(json!({
        "object": "list",
        "data": list.iter().map(|c| checkpoint_object(&job, c)).collect::<Vec<_>>(),
        "has_more": false,
        "first_id": list.first().map(|c| c.id.clone()),
        "last_id": list.last().map(|c| c.id.clone()),
    })))
}

#[derive(Debug, Deserialize)]
pub struct AdapterParams {
    format: Option<String>,
}

/// The adapter format a download asks for: `zip`, `safetensors`, `kohya`, which only
/// text-to-image jobs have and which is their default (the file SD UIs load), or `gguf`,
/// the LoRA GGUF llama.cpp loads, which decoder jobs have.
fn adapter_format<'a>(asked: Option<&'a str>, job: &JobRecord) -> ApiResult<&'a str> {
    let image = is_text_to_image(job);
    let format = asked.unwrap_or(if image { "kohya" } else { "zip" });
    if !["zip", "safetensors", "kohya", "gguf"].contains(&format) {
        return Err(
            ApiError::bad_request("format must be zip, safetensors, kohya or gguf").param("format"),
        );
    }
    if format == "kohya" && !image {
        return Err(ApiError::bad_request(format!(
            "Job {} is not a text-to-image job, so it has no kohya file; use zip or safetensors.",
            job.id
        ))
        .param("format"));
    }
    Ok(format)
}

/// A job's adapter without a LoRA GGUF: not a decoder's, or one llama.cpp cannot take.
fn no_gguf(id: &str) -> ApiError {
    ApiError::conflict(format!(
        "Job {id}'s adapter has no LoRA GGUF: loraforge writes one for decoder adapters \
         that llama.cpp can load (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 and \
         smollm3 models; LoRA pairs only, no whole trained modules, no adapter on a tied \
         output head). `loraforge export --adapter DIR --format lora-gguf` says why for \
         a downloaded adapter."
    ))
    .param("format")
    .code("gguf_not_available")
}

/// A file name from a fine-tuned model name (`ft:model:suffix:id`), for the UIs' LoRA
/// folders, which list a LoRA by its file stem.
fn kohya_file_stem(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// `GET /v1/fine_tuning/jobs/{id}/adapter`: the PEFT folder as a zip, with
/// `?format=safetensors` the tensor file alone, or with `?format=kohya` (the default
/// for text-to-image jobs) the kohya-format file SD UIs load.
pub async fn adapter(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<AdapterParams>,
) -> ApiResult<Response> {
    let job = get_job(&state, &who, &id).await?;
    if job.status() != Some(JobStatus::Succeeded) {
        return Err(ApiError::conflict(format!(
            "Job {id} has no adapter (status {}).",
            job.status
        ))
        .code("adapter_not_ready"));
    }
    let result = parse_json(&job.result);
    let format = adapter_format(q.format.as_deref(), &job)?;
    let etag = result
        .get("adapter_sha256")
        .and_then(|v| v.get(format))
        .and_then(|v| v.as_str())
        .map(|s| format!("\"{s}\""));
    // Every stored format but the LoRA GGUF is there for every job of its kind.
    if format == "gguf" && etag.is_none() {
        return Err(no_gguf(&id));
    }
    let filename = match format {
        "safetensors" => ADAPTER_TENSORS.to_string(),
        "kohya" => format!(
            "{}.safetensors",
            job.fine_tuned_model
                .as_deref()
                .map_or(id.clone(), kohya_file_stem)
        ),
        "gguf" => format!("{id}-{LORA_GGUF_FILE}"),
        _ => format!("{id}-adapter.zip"),
    };
    let download = Download {
        key: adapter_key(&id, format),
        etag,
        filename,
        zip: format == "zip",
    };
    send_blob(&state, &headers, download).await
}

/// A stored artifact as a download.
pub(super) struct Download {
    pub key: String,
    /// A strong validator of the blob's bytes, quoted.
    pub etag: Option<String>,
    pub filename: String,
    pub zip: bool,
}

/// The one download path of adapters, final and checkpoint alike: the blob streamed
/// (never read whole), `If-None-Match` answered with 304, one `bytes=` range with 206.
pub(super) async fn send_blob(
    state: &AppState,
    headers: &HeaderMap,
    d: Download,
) -> ApiResult<Response> {
    if let (Some(tag), Some(inm)) = (
        &d.etag,
        headers
            .get(header::IF_NONE_MATCH)
            .and_then(|v| v.to_str().ok()),
    ) {
        if inm.split(',').any(|t| t.trim() == tag || t.trim() == "*") {
            let mut r = axum::http::StatusCode::NOT_MODIFIED.into_response();
            r.headers_mut().insert(
                header::ETAG,
                HeaderValue::from_str(tag).map_err(ApiError::internal)?,
            );
            return Ok(r);
        }
    }
    let (size, stream) = state.blobs.get(&d.key).await.map_err(ApiError::internal)?;
    let range = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .map_or(RangeAsk::Ignore, |r| parse_range(r, size));
    let stream = stream.map(|r| r.map_err(std::io::Error::other));
    let mut resp = match range {
        RangeAsk::Ignore => Body::from_stream(stream).into_response(),
        RangeAsk::Unsatisfiable => {
            let mut r = axum::http::StatusCode::RANGE_NOT_SATISFIABLE.into_response();
            r.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes */{size}")).map_err(ApiError::internal)?,
            );
            return Ok(r);
        }
        RangeAsk::Part(start, end) => {
            let mut r = (
                axum::http::StatusCode::PARTIAL_CONTENT,
                Body::from_stream(byte_range(stream, start, end)),
            )
                .into_response();
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_RANGE,
                HeaderValue::from_str(&format!("bytes {start}-{end}/{size}"))
                    .map_err(ApiError::internal)?,
            );
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(end - start + 1));
            r
        }
    };
    let partial = resp.status() == axum::http::StatusCode::PARTIAL_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(if d.zip {
            "application/zip"
        } else {
            "application/octet-stream"
        }),
    );
    if !partial {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    }
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{}\"", d.filename))
            .map_err(ApiError::internal)?,
    );
    if let Some(tag) = d.etag {
        h.insert(
            header::ETAG,
            HeaderValue::from_str(&tag).map_err(ApiError::internal)?,
        );
    }
    Ok(resp)
}

/// The bytes `start..=end` of a chunked stream, passing chunks through (sliced at the
/// ends) instead of collecting the body.
fn byte_range<S>(
    stream: S,
    start: u64,
    end: u64,
) -> impl futures::Stream<Item = std::io::Result<bytes::Bytes>>
where
    S: futures::Stream<Item = std::io::Result<bytes::Bytes>>,
{
    stream
        .scan(0u64, move |pos, chunk| {
            let item = chunk.map(|b| {
                let (from, len) = (*pos, b.len() as u64);
                *pos += len;
                let lo = start.saturating_sub(from).min(len);
                let hi = (end + 1).saturating_sub(from).min(len);
                b.slice(lo as usize..hi.max(lo) as usize)
            });
            // Past the range: stop reading the blob.
            let done = item.is_ok() && *pos > end + 1;
            futures::future::ready(if done && item.as_ref().is_ok_and(|b| b.is_empty()) {
                None
            } else {
                Some(item)
            })
        })
        .filter(|item| futures::future::ready(!matches!(item, Ok(b) if b.is_empty())))
}

#[derive(Debug, Deserialize)]
pub struct CheckpointPath {
    fine_tuning_job_id: String,
    checkpoint_id: String,
}

/// `GET /v1/fine_tuning/jobs/{id}/checkpoints/{checkpoint_id}/adapter`: the adapter as it
/// was at that step (a zip of the PEFT folder, or `?format=safetensors`), so a checkpoint
/// can be tried or kept without the optimizer state that resuming needs.
pub async fn checkpoint_adapter(
    State(state): State<AppState>,
    who: Principal,
    Path(p): Path<CheckpointPath>,
    headers: HeaderMap,
    ApiQuery(q): ApiQuery<AdapterParams>,
) -> ApiResult<Response> {
    let job = get_job(&state, &who, &p.fine_tuning_job_id).await?;
    let format = adapter_format(q.format.as_deref(), &job)?;
    let ckpt = state
        .store
        .list_checkpoints(&p.fine_tuning_job_id)
        .await?
        .into_iter()
        .find(|c| c.id == p.checkpoint_id)
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "No such checkpoint {} of job {}",
                p.checkpoint_id, p.fine_tuning_job_id
            ))
            .param("checkpoint_id")
            .code("checkpoint_not_found")
        })?;
    let key = checkpoint_adapter_key(&ckpt.storage_key, format);
    if format == "zip" && !state.blobs.exists(&key).await.map_err(ApiError::internal)? {
        zip_stored_checkpoint(&state, &job, &ckpt).await?;
    }
    if format == "gguf" && !state.blobs.exists(&key).await.map_err(ApiError::internal)? {
        return Err(no_gguf(&p.fine_tuning_job_id));
    }
    let base = format!("{}-step-{}", ckpt.job_id, ckpt.step);
    let filename = match format {
        "kohya" => format!("{base}.safetensors"),
        "safetensors" => format!("{base}-adapter_model.safetensors"),
        "gguf" => format!("{base}-{LORA_GGUF_FILE}"),
        _ => format!("{base}-adapter.zip"),
    };
    // A checkpoint's blobs are written once, before its row, under a key of their own
    // (job, attempt, step): the key names the bytes as well as a hash would.
    let etag = Some(format!("\"{}\"", sha256_hex(key.as_bytes())));
    let download = Download {
        key,
        etag,
        filename,
        zip: format == "zip",
    };
    send_blob(&state, &headers, download).await
}

/// Builds and stores the zip of a checkpoint stored before checkpoints kept one, from its
/// stored files, with the same builder the worker uses.
async fn zip_stored_checkpoint(
    state: &AppState,
    job: &JobRecord,
    ckpt: &CheckpointRecord,
) -> ApiResult<()> {
    let dir = state
        .blobs
        .tmp_dir()
        .join(format!("ckpt-zip-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).map_err(ApiError::internal)?;
    for name in [ADAPTER_CONFIG, ADAPTER_TENSORS]
        .into_iter()
        .chain(extra_files())
    {
        let key = format!("{}/{name}", ckpt.storage_key);
        if !state.blobs.exists(&key).await.map_err(ApiError::internal)? {
            continue;
        }
        let bytes = state.blobs.read(&key).await.map_err(ApiError::internal)?;
        std::fs::write(dir.join(name), bytes).map_err(ApiError::internal)?;
    }
    let card = model_card(job, Some(ckpt.step as u64));
    let dir2 = dir.clone();
    let zip = tokio::task::spawn_blocking(move || adapter_zip(&dir2, &card))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal);
    let _ = std::fs::remove_dir_all(&dir);
    let zip = zip?;
    state
        .blobs
        .put(&checkpoint_adapter_key(&ckpt.storage_key, "zip"), &zip)
        .await
        .map_err(ApiError::internal)
}

/// What a `Range` header asks of a `size`-byte body (RFC 9110 §14.2).
#[derive(Debug, PartialEq)]
enum RangeAsk {
    /// Not a byte range we understand (another unit, garbage, `5-2`): ignored, and
    /// the whole body is sent.
    Ignore,
    /// A byte range that lies past the end: 416.
    Unsatisfiable,
    /// `first..=last`. Several ranges are answered with the first alone.
    Part(u64, u64),
}

fn parse_range(h: &str, size: u64) -> RangeAsk {
    let Some(spec) = h
        .trim()
        .strip_prefix("bytes=")
        .and_then(|s| s.split(',').next())
        .map(str::trim)
    else {
        return RangeAsk::Ignore;
    };
    let Some((a, b)) = spec.split_once('-') else {
        return RangeAsk::Ignore;
    };
    let num = |s: &str| s.trim().parse::<u64>().ok();
    match (a.trim(), b.trim()) {
        ("", "") => RangeAsk::Ignore,
        // The last n bytes.
        ("", n) => match num(n) {
            None => RangeAsk::Ignore,
            Some(0) => RangeAsk::Unsatisfiable,
            Some(_) if size == 0 => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(size - n.min(size), size - 1),
        },
        (a, b) => match (
            num(a),
            if b.is_empty() {
                Some(None)
            } else {
                num(b).map(Some)
            },
        ) {
            (Some(first), Some(last)) => match last {
                Some(last) if last < first => RangeAsk::Ignore,
                _ if first >= size => RangeAsk::Unsatisfiable,
                last => RangeAsk::Part(first, last.unwrap_or(u64::MAX).min(size - 1)),
            },
            _ => RangeAsk::Ignore,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::{parse_range, RangeAsk::*};

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-9", 100), Part(0, 9));
        assert_eq!(parse_range("bytes=90-", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=-10", 100), Part(90, 99));
        assert_eq!(parse_range("bytes=95-200", 100), Part(95, 99));
        assert_eq!(parse_range("bytes=0-9, 20-29", 100), Part(0, 9));
        // Past the end: 416.
        assert_eq!(parse_range("bytes=100-", 100), Unsatisfiable);
        assert_eq!(parse_range("bytes=-0", 100), Unsatisfiable);
        // Malformed, or another unit: ignored (RFC 9110), the whole body is sent.
        assert_eq!(parse_range("bytes=5-1", 100), Ignore);
        assert_eq!(parse_range("items=0-1", 100), Ignore);
        assert_eq!(parse_range("bytes=abc", 100), Ignore);
        assert_eq!(parse_range("bytes=-", 100), Ignore);
    }
}
