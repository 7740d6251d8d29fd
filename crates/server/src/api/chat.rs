//! `/v1/chat/completions` and `/v1/completions` in OpenAI's shapes, on base models and
//! on fine-tuned ones (`ft:...`, and their checkpoints `ft:...:ckpt-step-N`).

use super::{clip, ApiError, ApiResult};
use crate::app::AppState;
use crate::auth::Principal;
use crate::inference;
use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use loraforge_trainer::data::Message;
use loraforge_trainer::families::decoder::generate::{generate_ids, GenerateOptions};
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;

/// The parameters both endpoints share; others OpenAI defines are accepted and ignored.
#[derive(Debug, Deserialize)]
pub struct Request {
    model: Option<String>,
    messages: Option<Vec<Value>>,
    prompt: Option<Value>,
    max_tokens: Option<u64>,
    max_completion_tokens: Option<u64>,
    temperature: Option<f64>,
    top_p: Option<f64>,
    seed: Option<u64>,
    stop: Option<Value>,
    n: Option<u64>,
    stream: Option<bool>,
}

/// Default completion length when the request gives none.
const DEFAULT_MAX_TOKENS: u64 = 256;

/// More bytes than any one token of a BPE vocabulary covers in practice (long runs of
/// spaces included): a prompt longer than this many bytes per context token cannot fit.
const MAX_BYTES_PER_TOKEN: usize = 64;

fn messages(raw: &[Value]) -> ApiResult<Vec<Message>> {
    if raw.is_empty() {
        return Err(ApiError::bad_request("messages must be a non-empty array").param("messages"));
    }
    raw.iter()
        .enumerate()
        .map(|(i, m)| {
            let bad = |what: &str| {
                ApiError::bad_request(format!("messages[{i}]: {what}"))
                    .param(format!("messages[{i}]"))
            };
            let role = m
                .get("role")
                .and_then(|r| r.as_str())
                .ok_or_else(|| bad("role must be a string"))?;
            if !["system", "user", "assistant", "developer", "tool"].contains(&role) {
                return Err(bad(&format!("unknown role {}", clip(role))));
            }
            let content = match m.get("content") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .map(|p| p.get("text").and_then(|t| t.as_str()).map(String::from))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| bad("only text content parts are supported"))?
                    .concat(),
                Some(Value::Null) | None => String::new(),
                Some(_) => return Err(bad("content must be a string or a list of text parts")),
            };
            // Chat templates know `system`; OpenAI's newer name for it is `developer`.
            let role = if role == "developer" { "system" } else { role };
            Ok(Message {
                role: role.into(),
                content,
                ..Default::default()
            })
        })
        .collect()
}

fn stops(v: &Option<Value>) -> ApiResult<Vec<String>> {
    let bad = || {
        ApiError::bad_request("stop must be a string or a list of up to 4 strings").param("stop")
    };
    match v {
        None | Some(Value::Null) => Ok(vec![]),
        Some(Value::String(s)) if !s.is_empty() => Ok(vec![s.clone()]),
        Some(Value::Array(a)) if a.len() <= 4 => a
            .iter()
            .map(|x| {
                x.as_str()
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .ok_or_else(bad)
            })
            .collect(),
        _ => Err(bad()),
    }
}

enum Prompt {
    Chat(Vec<Message>),
    Text(String),
}

enum Piece {
    Text(String),
    End(Result<(&'static str, usize, usize), String>),
}

fn now() -> i64 {
    loraforge_store::now_secs()
}

async fn complete(
    state: AppState,
    who: Principal,
    req: Request,
    chat: bool,
) -> ApiResult<Response> {
    let model = req
        .model
        .clone()
        .ok_or_else(|| ApiError::bad_request("model is required").param("model"))?;
    if req.n.unwrap_or(1) != 1 {
        return Err(ApiError::bad_request("only n = 1 is supported").param("n"));
    }
    let prompt = if chat {
        Prompt::Chat(messages(req.messages.as_deref().unwrap_or(&[]))?)
    } else {
        match &req.prompt {
            Some(Value::String(s)) => Prompt::Text(s.clone()),
            Some(Value::Array(a)) if a.len() == 1 && a[0].is_string() => {
                Prompt::Text(a[0].as_str().unwrap_or_default().into())
            }
            _ => return Err(ApiError::bad_request("prompt must be a string").param("prompt")),
        }
    };
    let temperature = req.temperature.unwrap_or(1.0);
    if !(0.0..=2.0).contains(&temperature) {
        return Err(
            ApiError::bad_request("temperature must be between 0 and 2").param("temperature")
        );
    }
    let top_p = req.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::bad_request("top_p must be in (0, 1]").param("top_p"));
    }
    let stop = stops(&req.stop)?;
    let resolved = inference::resolve(&state, &model, who.owner_filter())
        .await
        .map_err(|e| ApiError::unservable(e, &model))?;
    let engine = state.engine.clone();
    let dir = inference::adapter_dir(&state, &engine, &resolved)
        .await
        .map_err(ApiError::internal)?;
    let (base, adapter) = {
        let (engine, resolved) = (engine.clone(), resolved.clone());
        tokio::task::spawn_blocking(move || inference::load(&engine, &resolved, dir.as_deref()))
            .await
            .map_err(ApiError::internal)?
            .map_err(ApiError::internal)?
    };
    // Tokenize first: an over-long prompt is a 400 before any streaming starts. A prompt
    // with more bytes than the context could hold at the longest tokens is refused
    // without tokenizing it at all; the rest is tokenized beside the model's lock, with
    // the tokenizer's own copy, so that a long prompt delays no one's generation.
    let ctx_len = base.context_length;
    let prompt_bytes = match &prompt {
        Prompt::Chat(m) => m.iter().map(|m| m.content.len()).sum(),
        Prompt::Text(t) => t.len(),
    };
    if prompt_bytes > ctx_len.saturating_mul(MAX_BYTES_PER_TOKEN) {
        return Err(ApiError::bad_request(format!(
            "The prompt is {prompt_bytes} bytes, more than `{model}`'s context of {ctx_len} tokens can hold."
        ))
        .param(if chat { "messages" } else { "prompt" })
        .code("context_length_exceeded"));
    }
    let ids = {
        let base = base.clone();
        tokio::task::spawn_blocking(move || match &prompt {
            Prompt::Chat(m) => base.chat_ids(m),
            Prompt::Text(t) => base.text_ids(t),
        })
        .await
        .map_err(ApiError::internal)?
    };
    let ids =
        ids.map_err(|e| ApiError::bad_request(format!("The prompt cannot be encoded: {e}")))?;
    if ids.len() >= ctx_len {
        return Err(ApiError::bad_request(format!(
            "The prompt is {} tokens; `{model}` has a context of {ctx_len} tokens.",
            ids.len()
        ))
        .param(if chat { "messages" } else { "prompt" })
        .code("context_length_exceeded"));
    }
    if ids.is_empty() {
        // Generation needs at least one token to condition on (an empty raw prompt on a
        // tokenizer that adds no BOS encodes to nothing).
        return Err(
            ApiError::bad_request("The prompt encodes to no tokens.").param(if chat {
                "messages"
            } else {
                "prompt"
            }),
        );
    }
    let room = (ctx_len - ids.len()) as u64;
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or(DEFAULT_MAX_TOKENS.min(room));
    if max_tokens == 0 || max_tokens > room {
        return Err(ApiError::bad_request(format!(
            "max_tokens must be between 1 and {room}: the prompt is {} tokens of the model's {ctx_len}.",
            ids.len()
        ))
        .param("max_tokens"));
    }
    let opts = GenerateOptions {
        max_new_tokens: max_tokens as usize,
        temperature,
        top_p,
        seed: req.seed.unwrap_or(0),
        chat,
        stop,
        ignore_eos: false,
    };
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Piece>();
    tokio::task::spawn_blocking(move || {
        let out = inference::with_model(&base, adapter.as_deref(), |b| {
            generate_ids(b, ids, &opts, &mut |t| {
                tx.send(Piece::Text(t.to_string())).is_ok()
            })
        });
        if let Ok(Ok(g)) = &out {
            // How far a generation went, and why it ended ("cancelled": the client left).
            tracing::info!(
                finish_reason = g.finish_reason,
                completion_tokens = g.completion_tokens,
                "generation ended"
            );
        }
        let end = match out {
            Ok(Ok(g)) => Ok((g.finish_reason, g.prompt_tokens, g.completion_tokens)),
            Ok(Err(e)) => Err(e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        let _ = tx.send(Piece::End(end));
    });
    let id = format!(
        "{}-{}",
        if chat { "chatcmpl" } else { "cmpl" },
        uuid::Uuid::new_v4().simple()
    );
    let created = now();
    let usage = |p: usize, c: usize| json!({"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c});

    if !req.stream.unwrap_or(false) {
        let mut text = String::new();
        let (finish, p, c) = loop {
            match rx.recv().await {
                Some(Piece::Text(t)) => text.push_str(&t),
                Some(Piece::End(Ok(e))) => break e,
                Some(Piece::End(Err(e))) => return Err(ApiError::internal(e)),
                None => return Err(ApiError::internal("generation ended without a result")),
            }
        };
        let body = if chat {
            json!({"id": id, "object": "chat.completion", "created": created, "model": model,
                   "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                                "finish_reason": finish, "logprobs": null}],
                   "usage": usage(p, c)})
        } else {
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": null}],
                   "usage": usage(p, c)})
        };
        return Ok(Json(body).into_response());
    }

    // Streaming: one chunk per piece of text, a last chunk with finish_reason and usage,
    // then `[DONE]`. Dropping the response (client gone) closes the channel, which stops
    // the generation at its next token and frees the model for the next request.
    let chunk = move |delta: Value, finish: Value, usage: Value| -> Event {
        let choice = if chat {
            json!({"index": 0, "delta": delta, "finish_reason": finish, "logprobs": null})
        } else {
            json!({"index": 0, "text": delta.get("content").cloned().unwrap_or(json!("")), "finish_reason": finish, "logprobs": null})
        };
        let mut c = json!({"id": id, "object": if chat { "chat.completion.chunk" } else { "text_completion" },
                           "created": created, "model": model, "choices": [choice]});
        if !usage.is_null() {
            c["usage"] = usage;
        }
        Event::default().data(c.to_string())
    };
    let first = chat.then(|| {
        chunk(
            json!({"role": "assistant", "content": ""}),
            Value::Null,
            Value::Null,
        )
    });
    let stream = futures::stream::unfold((rx, false), move |(mut rx, done)| {
        let chunk = chunk.clone();
        async move {
            if done {
                return None;
            }
            let events: Vec<Result<Event, Infallible>> = match rx.recv().await {
                Some(Piece::Text(t)) => {
                    vec![Ok(chunk(json!({"content": t}), Value::Null, Value::Null))]
                }
                Some(Piece::End(Ok((finish, p, c)))) => vec![
                    Ok(chunk(json!({}), json!(finish), usage(p, c))),
                    Ok(Event::default().data("[DONE]")),
                ],
                Some(Piece::End(Err(e))) => {
                    tracing::error!(error = %e, "generation failed mid-stream");
                    let err = json!({"error": {"message": "generation failed", "type": "server_error", "param": null, "code": null}});
                    vec![
                        Ok(Event::default().data(err.to_string())),
                        Ok(Event::default().data("[DONE]")),
                    ]
                }
                None => return None,
            };
            let last = events.len() == 2;
            Some((futures::stream::iter(events), (rx, last)))
        }
    });
    use futures::StreamExt;
    let stream = futures::stream::iter(first.map(Ok)).chain(stream.flatten());
    let mut resp = Sse::new(stream).into_response();
    resp.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    Ok(resp)
}

fn parse(body: &[u8]) -> ApiResult<Request> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("Invalid JSON body: {e}")))
}

/// `POST /v1/chat/completions`.
pub async fn chat_completions(
    State(state): State<AppState>,
    who: Principal,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let body = super::json_body(&state, body).await?;
    complete(state, who, parse(&body)?, true).await
}

/// `POST /v1/completions`.
pub async fn completions(
    State(state): State<AppState>,
    who: Principal,
    body: axum::body::Body,
) -> ApiResult<Response> {
    let body = super::json_body(&state, body).await?;
    complete(state, who, parse(&body)?, false).await
}
