//! `POST /v1/audio/transcriptions` in OpenAI's shape, on base Whisper models and their
//! fine-tunes (`ft:...`, checkpoints `ft:...:ckpt-step-N`), adapters switched in per
//! request as chat's are.

use super::{clip, ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::inference;
use crate::upload;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_trainer::families::speech::audio::{decode_16k, MAX_FILE_SECONDS, SAMPLE_RATE};
use loraforge_trainer::families::speech::transcribe::Window;
use loraforge_trainer::train::Task;
use serde_json::json;
use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// OpenAI's file limit for transcriptions.
pub const MAX_AUDIO_BYTES: usize = 25 << 20;

/// Room for the form's other fields and the multipart framing.
const FORM_OVERHEAD_BYTES: usize = 64 << 10;

/// Longest text field accepted (a `prompt` included).
const MAX_FIELD_BYTES: usize = 16 << 10;

/// What the form asks for.
#[derive(Default)]
struct Form {
    file: Option<(String, bytes::Bytes)>,
    model: Option<String>,
    language: Option<String>,
    response_format: Option<String>,
}

/// Reads the multipart form: the body counted against the cap as it arrives (a bigger
/// one is a 413 before more is read), then parsed.
async fn read_form(state: &AppState, req: Request) -> ApiResult<Form> {
    let cap = (MAX_AUDIO_BYTES + FORM_OVERHEAD_BYTES) as u64;
    if super::files::content_length(req.headers()).is_some_and(|n| n > cap) {
        return Err(ApiError::too_large(cap));
    }
    let (ctype, essence) = super::files::content_type(req.headers());
    if essence != "multipart/form-data" {
        return Err(ApiError::unsupported_media_type(format!(
            "Unsupported Content-Type {}: send multipart/form-data with `file` and `model`.",
            clip(&ctype)
        )));
    }
    let over = Arc::new(AtomicBool::new(false));
    let (parts, body) = req.into_parts();
    let counted = upload::capped(
        body.into_data_stream(),
        cap,
        over.clone(),
        state.settings.upload_idle_timeout,
    );
    let bytes = axum::body::to_bytes(Body::from_stream(counted), usize::MAX)
        .await
        .map_err(|e| {
            if over.load(Ordering::SeqCst) {
                ApiError::too_large(cap)
            } else {
                ApiError::bad_request(format!("The request body could not be read: {e}"))
            }
        })?;
    let req = Request::from_parts(parts, Body::from(bytes));
    let mut multipart = Multipart::from_request(req, state)
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?;
    let mut form = Form::default();
    while let Some(field) = multipart
        .next_field()
        .await
        .map_err(|e| ApiError::bad_request(e.body_text()))?
    {
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let data = field
            .bytes()
            .await
            .map_err(|e| ApiError::bad_request(e.body_text()))?;
        if name == "file" {
            if form.file.is_some() {
                return Err(
                    ApiError::bad_request("Only one `file` field is allowed.").param("file")
                );
            }
            if data.len() > MAX_AUDIO_BYTES {
                return Err(ApiError::too_large(MAX_AUDIO_BYTES as u64));
            }
            form.file = Some((file_name.unwrap_or_else(|| "audio".into()), data));
            continue;
        }
        // Fields not read here (OpenAI's `prompt`, `temperature`,
        // `timestamp_granularities[]`) are accepted and not used.
        let known = ["model", "language", "response_format"];
        let Some(key) = known.into_iter().find(|k| *k == name) else {
            continue;
        };
        if data.len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(format!(
                "The `{key}` field is longer than {MAX_FIELD_BYTES} bytes."
            ))
            .param(key));
        }
        let text = String::from_utf8(data.to_vec())
            .map(|t| t.trim().to_string())
            .map_err(|_| {
                ApiError::bad_request(format!("The `{key}` field is not UTF-8.")).param(key)
            })?;
        match key {
            "model" => form.model = Some(text),
            "language" => form.language = Some(text).filter(|l| !l.is_empty()),
            _ => form.response_format = Some(text),
        }
    }
    Ok(form)
}

/// Sets its flag when dropped: a request whose client left, or that ran past the
/// request timeout, stops its transcription at the next token.
struct CancelOnDrop(Arc<AtomicBool>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// `len(text) / len(zlib(text))`, OpenAI's `compression_ratio` (high: repetition).
fn compression_ratio(text: &str) -> f64 {
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let packed = z
        .write_all(text.as_bytes())
        .and_then(|_| z.finish())
        .map_or(1, |v| v.len());
    text.len() as f64 / packed.max(1) as f64
}

/// `POST /v1/audio/transcriptions`: multipart `file` (WAV or FLAC), `model`, `language`,
/// `response_format` (`json`, `text` or `verbose_json`).
pub async fn transcriptions(
    State(state): State<AppState>,
    who: Principal,
    req: Request,
) -> ApiResult<Response> {
    let form = read_form(&state, req).await?;
    let model = form
        .model
        .filter(|m| !m.is_empty())
        .ok_or_else(|| ApiError::bad_request("model is required").param("model"))?;
    let format = form.response_format.unwrap_or_else(|| "json".into());
    if !["json", "text", "verbose_json"].contains(&format.as_str()) {
        return Err(ApiError::bad_request(format!(
            "response_format {} is not supported here (json, text or verbose_json).",
            clip(&format)
        ))
        .param("response_format"));
    }
    let (file_name, audio) = form
        .file
        .ok_or_else(|| ApiError::bad_request("file is required").param("file"))?;
    let resolved =
        inference::resolve_for(&state, &model, who.owner_filter(), Task::SpeechRecognition)
            .await
            .map_err(|e| ApiError::unservable(e, &model))?;
    let engine = state.engine.clone();
    let dir = inference::adapter_dir(&state, &engine, &resolved)
        .await
        .map_err(ApiError::internal)?;
    // The model first (cached after the first request): the language is checked against
    // its tokenizer before any audio is decoded.
    let (whisper, adapter) = {
        let (engine, resolved) = (engine.clone(), resolved.clone());
        tokio::task::spawn_blocking(move || {
            inference::load_speech(&engine, &resolved, dir.as_deref())
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            ApiError::bad_request(format!(
                "The model {} cannot transcribe: {e:#}",
                clip(&model)
            ))
            .param("model")
            .code("model_not_supported")
        })?
    };
    if let Some(l) = &form.language {
        whisper
            .text
            .prompt(l)
            .map_err(|e| ApiError::bad_request(e.detail()).param("language"))?;
    }
    let shown = clip(&file_name);
    let samples = tokio::task::spawn_blocking(move || decode_16k(&audio, &shown, MAX_FILE_SECONDS))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| {
            ApiError::bad_request(format!(
                "The audio file could not be read: {} (WAV and FLAC are read).",
                e.detail()
            ))
            .param("file")
            .code("invalid_audio")
        })?;
    let duration = samples.len() as f64 / f64::from(SAMPLE_RATE);
    let cancel = Arc::new(AtomicBool::new(false));
    let _stop = CancelOnDrop(cancel.clone());
    let language = form.language;
    let (transcript, segments) = tokio::task::spawn_blocking(move || {
        inference::with_speech(&whisper, adapter.as_deref(), |t| {
            let mut segments = Vec::new();
            let mut each = |w: &Window| {
                segments.push(json!({
                    "id": segments.len(), "seek": (w.start * 100.0).round() as u64,
                    "start": w.start, "end": w.end, "text": w.text,
                    "tokens": w.decoded.tokens, "temperature": 0.0,
                    "avg_logprob": w.decoded.avg_logprob,
                    "compression_ratio": compression_ratio(w.text),
                    "no_speech_prob": w.no_speech_prob,
                }));
            };
            t.transcribe(&samples, language.as_deref(), &cancel, &mut each)
                .map(|r| (r, segments))
        })
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    Ok(match format.as_str() {
        "text" => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            transcript.text,
        )
            .into_response(),
        "verbose_json" => Json(json!({
            "task": "transcribe",
            "language": language_name(&transcript.language),
            "duration": duration,
            "text": transcript.text,
            "segments": segments,
        }))
        .into_response(),
        _ => Json(json!({"text": transcript.text})).into_response(),
    })
}

/// OpenAI's `verbose_json` names the language in English words; the codes here are
/// Whisper's most common, and others are given as their code.
fn language_name(code: &str) -> String {
    let name = match code.trim().to_ascii_lowercase().as_str() {
        "en" => "english",
        "de" => "german",
        "fr" => "french",
        "es" => "spanish",
        "it" => "italian",
        "pt" => "portuguese",
        "nl" => "dutch",
        "ru" => "russian",
        "zh" => "chinese",
        "ja" => "japanese",
        "ko" => "korean",
        "pl" => "polish",
        "tr" => "turkish",
        "uk" => "ukrainian",
        "sv" => "swedish",
        "ar" => "arabic",
        "hi" => "hindi",
        _ => return code.to_string(),
    };
    name.to_string()
}
