//! `POST /v1/audio/transcriptions` in OpenAI's shape, on base Whisper models and their
//! fine-tunes (`ft:...`, checkpoints `ft:...:ckpt-step-N`), adapters switched in per
//! request as chat's are.

use super::{clip, ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::inference::{self, ResolveError};
use crate::train_cmd::MAX_AUDIO_SECONDS;
use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_trainer::families::speech::audio::decode_16k;
use loraforge_trainer::train::Task;
use serde_json::json;

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

async fn read_form(state: &AppState, req: Request) -> ApiResult<Form> {
    let ctype = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if !ctype.starts_with("multipart/form-data") {
        return Err(ApiError::unsupported_media_type(format!(
            "Unsupported Content-Type {}: send multipart/form-data with `file` and `model`.",
            clip(&ctype)
        )));
    }
    let (parts, body) = req.into_parts();
    let cap = MAX_AUDIO_BYTES + FORM_OVERHEAD_BYTES;
    let bytes = axum::body::to_bytes(body, cap)
        .await
        .map_err(|_| ApiError::too_large(cap as u64).param("file"))?;
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
            if data.len() > MAX_AUDIO_BYTES {
                return Err(ApiError::too_large(MAX_AUDIO_BYTES as u64).param("file"));
            }
            form.file = Some((file_name.unwrap_or_else(|| "audio".into()), data));
            continue;
        }
        if data.len() > MAX_FIELD_BYTES {
            return Err(ApiError::bad_request(format!(
                "The `{}` field is longer than {MAX_FIELD_BYTES} bytes.",
                clip(&name)
            ))
            .param(name));
        }
        let text = || {
            String::from_utf8(data.to_vec())
                .map(|t| t.trim().to_string())
                .map_err(|_| ApiError::bad_request(format!("The `{name}` field is not UTF-8.")))
        };
        match name.as_str() {
            "model" => form.model = Some(text()?),
            "language" => form.language = Some(text()?).filter(|l| !l.is_empty()),
            "response_format" => form.response_format = Some(text()?),
            // Accepted and not used: greedy decoding has no temperature or prompt
            // conditioning here, and segments are the 30 s windows.
            _ => {}
        }
    }
    Ok(form)
}

/// `POST /v1/audio/transcriptions`: multipart `file` (WAV), `model`, `language`,
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
    let language = form
        .language
        .unwrap_or_else(|| loraforge_trainer::families::speech::DEFAULT_LANGUAGE.to_string());
    let resolved =
        inference::resolve_for(&state, &model, who.owner_filter(), Task::SpeechRecognition)
            .await
            .map_err(|e| match e {
                ResolveError::NotFound => {
                    ApiError::not_found(format!("The model {} does not exist.", clip(&model)))
                        .param("model")
                        .code("model_not_found")
                }
                ResolveError::NotReady(m) => {
                    ApiError::conflict(m).param("model").code("model_not_ready")
                }
                ResolveError::NotGenerative(m) => ApiError::bad_request(m)
                    .param("model")
                    .code("model_not_supported"),
                ResolveError::Store(e) => e.into(),
            })?;
    let engine = state.engine.clone();
    let dir = inference::adapter_dir(&state, &engine, &resolved)
        .await
        .map_err(ApiError::internal)?;
    let shown = clip(&file_name);
    let samples =
        tokio::task::spawn_blocking(move || decode_16k(&audio, &shown, MAX_AUDIO_SECONDS))
            .await
            .map_err(ApiError::internal)?
            .map_err(|e| {
                let m = e.to_string();
                ApiError::bad_request(format!(
                    "The audio file could not be read: {} (WAV files are supported).",
                    m.trim_start_matches("data: ")
                ))
                .param("file")
                .code("invalid_audio")
            })?;
    let duration = samples.len() as f64 / 16_000.0;
    let shown_language = language_name(&language_code(&language));
    let (text, segments) = tokio::task::spawn_blocking(move || -> ApiResult<_> {
        let (model, adapter) = inference::load_speech(&engine, &resolved, dir.as_deref())
            .map_err(ApiError::internal)?;
        let mut t = model
            .lock()
            .map_err(|_| ApiError::internal("a transcription panicked"))?;
        t.use_adapter(adapter.as_deref())
            .map_err(ApiError::internal)?;
        t.text.prompt(&language).map_err(|e| {
            ApiError::bad_request(e.to_string().trim_start_matches("data: ").to_string())
                .param("language")
        })?;
        let mut segments = Vec::new();
        let text = t
            .transcribe(&samples, &language, &mut |w| {
                segments.push(
                    json!({"id": segments.len(), "seek": (w.start * 100.0).round() as u64,
                                     "start": w.start, "end": w.end, "text": w.text,
                                     "tokens": w.tokens, "temperature": 0.0}),
                );
            })
            .map_err(ApiError::internal)?;
        Ok((text, segments))
    })
    .await
    .map_err(ApiError::internal)??;
    Ok(match format.as_str() {
        "text" => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        "verbose_json" => Json(json!({
            "task": "transcribe",
            "language": shown_language,
            "duration": duration,
            "text": text,
            "segments": segments,
        }))
        .into_response(),
        _ => Json(json!({"text": text})).into_response(),
    })
}

fn language_code(l: &str) -> String {
    l.trim().to_ascii_lowercase()
}

/// OpenAI's `verbose_json` names the language in English words; the codes here are
/// Whisper's most common, and others are given as their code.
fn language_name(code: &str) -> String {
    let name = match code {
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
        other => other,
    };
    name.to_string()
}
