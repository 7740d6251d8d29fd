//! `/v1/files`: OpenAI-compatible uploads of training data.

use super::{clip, ApiError, ApiQuery, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::upload::{self, ReceiveError, Received};
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_store::{new_id, now_secs, DeleteFile, FileRecord, ListFiles, NewFile, Order};
use loraforge_trainer::data::DataFormat;
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The purposes we accept: loraforge stores training data only.
const PURPOSES: [&str; 1] = ["fine-tune"];
const MAX_FILENAME_BYTES: usize = 512;
const DEFAULT_FILENAME: &str = "upload.jsonl";

/// OpenAI's file object, plus what validation found (`sha256`, `format`,
/// `examples`, `validation_errors`).
#[derive(Debug, Serialize)]
pub struct FileObject {
    pub id: String,
    pub object: &'static str,
    pub bytes: i64,
    pub created_at: i64,
    pub expires_at: Option<i64>,
    pub filename: String,
    pub purpose: String,
    pub status: String,
    pub status_details: Option<String>,
    pub sha256: String,
    pub format: Option<String>,
    pub examples: Option<i64>,
    pub validation_errors: Vec<String>,
}

impl From<FileRecord> for FileObject {
    fn from(f: FileRecord) -> Self {
        let validation_errors = f
            .errors
            .as_deref()
            .and_then(|e| serde_json::from_str(e).ok())
            .unwrap_or_default();
        FileObject {
            id: f.id,
            object: "file",
            bytes: f.bytes,
            created_at: f.created_at,
            expires_at: None,
            filename: f.filename,
            purpose: f.purpose,
            status: f.status,
            status_details: f.status_details,
            sha256: f.sha256,
            format: f.format,
            examples: f.examples,
            validation_errors,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ListObject<T> {
    pub object: &'static str,
    pub data: Vec<T>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

#[derive(Debug, Serialize)]
pub struct DeletedObject {
    pub id: String,
    pub object: &'static str,
    pub deleted: bool,
}

#[derive(Debug, Deserialize)]
pub struct UploadParams {
    filename: Option<String>,
    purpose: Option<String>,
}

/// The most a multipart form field other than `file` may hold.
const MAX_FIELD_BYTES: usize = 4096;

fn check_purpose(p: &str) -> ApiResult<()> {
    if PURPOSES.contains(&p) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "Invalid purpose {}: loraforge accepts {}.",
            clip(p),
            PURPOSES.join(", ")
        ))
        .param("purpose"))
    }
}

/// The client's filename is metadata only (storage keys are ours), so any text is
/// harmless; we only refuse what would make it awkward to show.
fn check_filename(name: &str) -> ApiResult<()> {
    if name.is_empty() || name.len() > MAX_FILENAME_BYTES || name.chars().any(char::is_control) {
        return Err(ApiError::bad_request(format!(
            "Invalid filename: 1 to {MAX_FILENAME_BYTES} bytes without control characters."
        ))
        .param("filename"));
    }
    Ok(())
}

pub(crate) fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request's Content-Type, lower-cased: the whole header (for messages) and its
/// essence, the media type without parameters.
pub(crate) fn content_type(headers: &HeaderMap) -> (String, String) {
    let whole = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let essence = whole.split(';').next().unwrap_or("").trim().to_string();
    (whole, essence)
}

fn receive_error(e: ReceiveError) -> ApiError {
    match e {
        ReceiveError::TooLarge(cap) => ApiError::too_large(cap),
        ReceiveError::Body(m) => ApiError::bad_request(format!("The upload failed: {m}")),
        e => ApiError::internal(e),
    }
}

/// `POST /v1/files`: multipart (`file`, `purpose`) as the openai client sends it,
/// or the raw body (`curl --data-binary @train.jsonl`) with `?filename=&purpose=`.
pub async fn create(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(params): ApiQuery<UploadParams>,
    req: Request,
) -> ApiResult<Json<FileObject>> {
    let cap = state.settings.max_upload_bytes;
    // Refuse before reading a byte when the client announces too much.
    if content_length(req.headers()).is_some_and(|n| n > cap) {
        return Err(ApiError::too_large(cap));
    }
    let (ctype, essence) = content_type(req.headers());
    match essence.as_str() {
        "multipart/form-data" => create_multipart(state, &who, req).await,
        "application/jsonl"
        | "application/x-ndjson"
        | "application/jsonlines"
        | "application/json-lines"
        | "application/zip"
        | "application/x-zip-compressed"
        | "application/octet-stream" => {
            let purpose = params.purpose.unwrap_or_else(|| "fine-tune".into());
            check_purpose(&purpose)?;
            let filename = params.filename.unwrap_or_else(|| DEFAULT_FILENAME.into());
            check_filename(&filename)?;
            let over = Arc::new(AtomicBool::new(false));
            let body = upload::capped(
                req.into_body().into_data_stream(),
                cap,
                over.clone(),
                state.settings.upload_idle_timeout,
            );
            let received = upload::receive(&state.blobs, body, cap, state.settings.min_examples)
                .await
                .map_err(|e| {
                    if over.load(Ordering::SeqCst) {
                        ApiError::too_large(cap)
                    } else {
                        receive_error(e)
                    }
                })?;
            store(&state, &who, received, filename, purpose).await
        }
        _ => Err(ApiError::unsupported_media_type(format!(
            "Unsupported Content-Type {}: send multipart/form-data (fields `file` and \
             `purpose`), or the file itself as application/jsonl or application/octet-stream.",
            clip(&ctype)
        ))),
    }
}

async fn create_multipart(
    state: AppState,
    who: &Principal,
    req: Request,
) -> ApiResult<Json<FileObject>> {
    let cap = state.settings.max_upload_bytes;
    // Count the whole body against the cap (the file part is only part of it) and
    // remember that the cap, not the client, broke the stream.
    let over = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let counted = upload::capped(
        body.into_data_stream(),
        cap,
        over.clone(),
        state.settings.upload_idle_timeout,
    );
    let req = Request::from_parts(parts, Body::from_stream(counted));
    let mut multipart = Multipart::from_request(req, &state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let too_large = |over: &AtomicBool| over.load(Ordering::SeqCst);

    let mut purpose: Option<String> = None;
    let mut received: Option<(Received, String)> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(_) if too_large(&over) => return Err(ApiError::too_large(cap)),
            Err(e) => return Err(ApiError::bad_request(e.body_text())),
        };
        match field.name() {
            Some("purpose") => {
                // Read in chunks up to a small cap: a field is never held whole.
                let mut field = field;
                let mut bytes = Vec::new();
                while let Some(chunk) = field.chunk().await.transpose() {
                    let chunk = chunk.map_err(|e| {
                        if too_large(&over) {
                            ApiError::too_large(cap)
                        } else {
                            ApiError::bad_request(e.body_text())
                        }
                    })?;
                    if bytes.len() + chunk.len() > MAX_FIELD_BYTES {
                        // Read the rest away (bounded) before answering: closing on a
                        // client that is still sending hands it a reset, not the 400.
                        drop(field);
                        upload::linger(&mut multipart).await;
                        return Err(ApiError::bad_request(format!(
                            "The `purpose` field is longer than {MAX_FIELD_BYTES} bytes."
                        ))
                        .param("purpose"));
                    }
                    bytes.extend_from_slice(&chunk);
                }
                let text = String::from_utf8(bytes).map_err(|_| {
                    ApiError::bad_request("The `purpose` field is not UTF-8.").param("purpose")
                })?;
                check_purpose(text.trim())?;
                purpose = Some(text.trim().to_string());
            }
            Some("file") => {
                if received.is_some() {
                    return Err(
                        ApiError::bad_request("Only one `file` field is allowed.").param("file")
                    );
                }
                let filename = field.file_name().unwrap_or(DEFAULT_FILENAME).to_string();
                check_filename(&filename)?;
                let r = upload::receive(&state.blobs, field, cap, state.settings.min_examples)
                    .await
                    .map_err(|e| {
                        if too_large(&over) {
                            ApiError::too_large(cap)
                        } else {
                            receive_error(e)
                        }
                    })?;
                received = Some((r, filename));
            }
            // Fields the openai client may add (e.g. expires_after) are accepted and
            // ignored; their content still counts against the cap.
            _ => {
                let mut field = field;
                while let Some(chunk) = field.chunk().await.transpose() {
                    if let Err(e) = chunk {
                        return Err(if too_large(&over) {
                            ApiError::too_large(cap)
                        } else {
                            ApiError::bad_request(e.body_text())
                        });
                    }
                }
            }
        }
    }
    let Some((received, filename)) = received else {
        return Err(ApiError::bad_request("Missing the `file` field.").param("file"));
    };
    let Some(purpose) = purpose else {
        return Err(ApiError::bad_request("Missing the `purpose` field.").param("purpose"));
    };
    store(&state, who, received, filename, purpose).await
}

/// Moves a received upload into blob storage, then records it. If the row cannot be
/// written the blob is removed again.
async fn store(
    state: &AppState,
    who: &Principal,
    received: Received,
    filename: String,
    purpose: String,
) -> ApiResult<Json<FileObject>> {
    let id = new_id("file-");
    let report = &received.report;
    let ext = if matches!(
        report.format,
        Some(DataFormat::ImageZip | DataFormat::ImageClasses | DataFormat::AudioTranscripts)
    ) {
        "zip"
    } else {
        "jsonl"
    };
    let key = format!("files/{id}.{ext}");
    let ok = report.is_ok();
    let status_details = if ok {
        received.details.clone()
    } else {
        Some({
            let mut s = report.errors.join("\n");
            let more = report
                .error_count
                .saturating_sub(report.errors.len() as u64);
            if more > 0 {
                s.push_str(&format!("\n… and {more} more"));
            }
            s
        })
    };
    let record = NewFile {
        id: id.clone(),
        purpose,
        filename,
        bytes: received.bytes as i64,
        sha256: received.sha256.clone(),
        storage_key: key.clone(),
        status: if ok { "processed" } else { "error" }.into(),
        status_details,
        format: report.format.map(|f| f.as_str().to_string()),
        examples: Some(report.examples as i64),
        errors: (!ok).then(|| serde_json::to_string(&report.errors).unwrap_or_default()),
        created_at: now_secs(),
        api_key_id: who.owner_id().map(str::to_string),
    };
    state
        .blobs
        .commit(received.upload, &key)
        .await
        .map_err(ApiError::internal)?;
    // The quota is checked with the insert, in one transaction, so that uploads racing
    // each other cannot all fit under it.
    let quota = state.settings.max_stored_bytes_per_owner;
    match state.store.insert_file_within(&record, quota).await {
        Ok(f) => {
            tracing::info!(file_id = %f.id, bytes = f.bytes, status = %f.status, "file stored");
            Ok(Json(f.into()))
        }
        Err(e) => {
            if let Err(e) = state.blobs.delete(&key).await {
                tracing::warn!(%key, error = %e, "could not remove the blob of a failed upload");
            }
            Err(match e {
                loraforge_store::Error::OverLimit { used } => ApiError::new(
                    axum::http::StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "Storing these {} bytes would bring this key's files to {} bytes, over its \
                         quota of {quota} (--max-stored-bytes-per-owner); delete files to make room.",
                        record.bytes,
                        used + record.bytes
                    ),
                )
                .param("file")
                .code("storage_quota_exceeded"),
                e => e.into(),
            })
        }
    }
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    after: Option<String>,
    limit: Option<i64>,
    order: Option<Order>,
    purpose: Option<String>,
}

const MAX_LIMIT: i64 = 10_000;

/// `GET /v1/files`: newest first, cursor-paginated with `after`.
pub async fn list(
    State(state): State<AppState>,
    who: Principal,
    ApiQuery(p): ApiQuery<ListParams>,
) -> ApiResult<Json<ListObject<FileObject>>> {
    let limit = p.limit.unwrap_or(MAX_LIMIT);
    if !(1..=MAX_LIMIT).contains(&limit) {
        return Err(
            ApiError::bad_request(format!("limit must be between 1 and {MAX_LIMIT}"))
                .param("limit"),
        );
    }
    let page = state
        .store
        .list_files(&ListFiles {
            after: p.after,
            limit,
            order: p.order.unwrap_or_default(),
            purpose: p.purpose,
            owner: who.owner_filter().map(str::to_string),
        })
        .await
        .map_err(|e| match e {
            loraforge_store::Error::Invalid(m) => ApiError::bad_request(m).param("after"),
            e => e.into(),
        })?;
    let data: Vec<FileObject> = page.data.into_iter().map(FileObject::from).collect();
    Ok(Json(ListObject {
        object: "list",
        first_id: data.first().map(|f| f.id.clone()),
        last_id: data.last().map(|f| f.id.clone()),
        has_more: page.has_more,
        data,
    }))
}

fn file_not_found(id: &str) -> ApiError {
    ApiError::not_found(format!("No such File object: {id}"))
        .param("file_id")
        .code("file_not_found")
}

/// The file if the caller may see it; another owner's file is the same 404 as none.
async fn get_record(state: &AppState, who: &Principal, id: &str) -> ApiResult<FileRecord> {
    state
        .store
        .get_file_of(id, who.owner_filter())
        .await?
        .ok_or_else(|| file_not_found(id))
}

/// `GET /v1/files/{file_id}`.
pub async fn retrieve(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<FileObject>> {
    Ok(Json(get_record(&state, &who, &id).await?.into()))
}

/// A filename safe to put in a header: the last path segment, plain characters only.
fn header_filename(name: &str) -> String {
    let base = name.rsplit(['/', '\\']).next().unwrap_or("");
    let clean: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let clean = clean.trim_start_matches('.').to_string();
    if clean.is_empty() {
        "file.jsonl".into()
    } else {
        clean
    }
}

/// `GET /v1/files/{file_id}/content`: the bytes as uploaded, streamed.
pub async fn content(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Response> {
    let f = get_record(&state, &who, &id).await?;
    let (size, stream) = state.blobs.get(&f.storage_key).await.map_err(|e| match e {
        // A row without its blob is damage, not a client error.
        loraforge_store::Error::NotFound => {
            ApiError::internal(format!("blob {} of {} is missing", f.storage_key, f.id))
        }
        e => ApiError::internal(e),
    })?;
    let disposition = format!("attachment; filename=\"{}\"", header_filename(&f.filename));
    let mut resp = Body::from_stream(stream).into_response();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(
        header::ETAG,
        HeaderValue::from_str(&format!("\"{}\"", f.sha256)).map_err(ApiError::internal)?,
    );
    h.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&disposition).map_err(ApiError::internal)?,
    );
    Ok(resp)
}

/// `DELETE /v1/files/{file_id}`: refused (409) while a queued or running job uses it.
pub async fn delete(
    State(state): State<AppState>,
    who: Principal,
    Path(id): Path<String>,
) -> ApiResult<Json<DeletedObject>> {
    match state.store.delete_file_of(&id, who.owner_filter()).await? {
        DeleteFile::Deleted(f) => {
            if let Err(e) = state.blobs.delete(&f.storage_key).await {
                // The row is gone, so the file is deleted as far as anyone can see;
                // the orphan blob only costs space.
                tracing::warn!(key = %f.storage_key, error = %e, "could not remove a deleted file's blob");
            }
            // And no worker's folder keeps a copy of it.
            crate::job::workdir::remove_file_copies(&state.settings.data_dir, &f.id).await;
            Ok(Json(DeletedObject {
                id,
                object: "file",
                deleted: true,
            }))
        }
        DeleteFile::NotFound => Err(file_not_found(&id)),
        DeleteFile::InUse(job) => Err(ApiError::conflict(format!(
            "File {id} is used by fine-tuning job {job}, which is queued or running; \
             cancel the job or wait for it to finish."
        ))
        .param("file_id")
        .code("file_in_use")),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn header_filenames_are_plain() {
        use super::header_filename as h;
        assert_eq!(h("../../etc/passwd"), "passwd");
        assert_eq!(h("train data.jsonl"), "train_data.jsonl");
        assert_eq!(h("..\\x\"y.jsonl"), "x_y.jsonl");
        assert_eq!(h(".."), "file.jsonl");
    }
}
