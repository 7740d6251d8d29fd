//! Errors -> HTTP, in one place. Every error leaves as OpenAI's envelope
//! `{"error": {"message", "type", "param", "code"}}`; a server error is logged with
//! its cause (inside the request's span, so with its request id) and answered with
//! a generic message: internals never reach the client.

use crate::job::{cut, prefix};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub param: Option<std::borrow::Cow<'static, str>>,
    pub code: Option<&'static str>,
    /// The cause of a server error: logged, never sent.
    internal: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
            param: None,
            code: None,
            internal: None,
        }
    }

    pub fn param(mut self, param: impl Into<std::borrow::Cow<'static, str>>) -> Self {
        self.param = Some(param.into());
        self
    }

    pub fn code(mut self, code: &'static str) -> Self {
        self.code = Some(code);
        self
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, message)
    }

    pub fn too_large(cap: u64) -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The upload exceeds the maximum size of {cap} bytes."),
        )
        .param("file")
        .code("file_too_large")
    }

    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, message).code("unsupported_media_type")
    }

    /// A missing, wrong or revoked API key. The same answer for each, so that it
    /// tells nothing about which keys exist.
    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "Missing or invalid API key: send `Authorization: Bearer <key>`.",
        )
        .code("invalid_api_key")
    }

    /// A failure that is our fault; `cause` goes to the log only.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        ApiError {
            internal: Some(cause.to_string()),
            ..Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The server had an error while processing your request; \
                 the x-request-id response header identifies it in the server log.",
            )
        }
    }

    pub fn unavailable(cause: impl std::fmt::Display) -> Self {
        ApiError {
            internal: Some(cause.to_string()),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "The service is not ready.")
        }
    }

    fn kind(&self) -> &'static str {
        // OpenAI answers a bad key with `invalid_request_error` / `invalid_api_key`.
        match self.status.as_u16() {
            500.. => "server_error",
            _ => "invalid_request_error",
        }
    }
}

impl From<loraforge_store::Error> for ApiError {
    fn from(e: loraforge_store::Error) -> Self {
        use loraforge_store::Error as E;
        match e {
            E::NotFound => ApiError::not_found("Not found."),
            E::Conflict(m) => ApiError::conflict(m),
            E::Invalid(m) => ApiError::bad_request(m),
            e if e.is_unavailable() => {
                tracing::warn!(error = %e, "database unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The database is unavailable; retry shortly.",
                )
                .code("database_unavailable")
            }
            e => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Some(cause) = &self.internal {
            tracing::error!(status = self.status.as_u16(), error = %cause, "request failed");
        }
        // A last guard: whatever a message quoted, the answer stays short.
        let body = json!({
            "error": {
                "message": cut(&self.message, MAX_MESSAGE),
                "type": self.kind(),
                "param": self.param.as_deref().map(|p| cut(p, MAX_PARAM)),
                "code": self.code,
            }
        });
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert("www-authenticate", HeaderValue::from_static("Bearer"));
        }
        if self.status == StatusCode::CONFLICT {
            // The openai client retries 409s unless told not to; a conflict here
            // (a file in use) will not resolve itself within its retry window.
            resp.headers_mut()
                .insert("x-should-retry", HeaderValue::from_static("false"));
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The longest error message and `param` sent, in characters.
const MAX_MESSAGE: usize = 1024;
const MAX_PARAM: usize = 128;
/// How much of a client's value an error message quotes.
const CLIP: usize = 64;

/// A client's value as an error message quotes it: in quotes, and only its first 64
/// characters, so that a huge value is never sent back (nor formatted whole).
pub fn clip(s: &str) -> String {
    let short = prefix(s, CLIP);
    let quoted = format!("{short:?}");
    if short.len() < s.len() {
        format!("{quoted}… ({} bytes)", s.len())
    } else {
        quoted
    }
}

impl From<crate::job::SpecError> for ApiError {
    fn from(e: crate::job::SpecError) -> Self {
        ApiError::bad_request(e.message).param(e.param)
    }
}

impl From<loraforge_trainer::families::Refusal> for ApiError {
    fn from(r: loraforge_trainer::families::Refusal) -> Self {
        use loraforge_trainer::families::Field;
        let e = ApiError::bad_request(r.message);
        match r.field {
            Field::Model => e.param("model"),
            Field::TrainingFile => e.param("training_file").code("invalid_file"),
            Field::ValidationFile => e.param("validation_file").code("invalid_file"),
            Field::Hyperparameter(k) => e.param(format!("hyperparameters.{k}")),
            Field::Setting(k) => e.param(k),
        }
    }
}

impl ApiError {
    /// Why the request's `model` cannot be served, on the `model` field.
    pub fn unservable(e: crate::inference::ResolveError, model: &str) -> Self {
        use crate::inference::ResolveError;
        match e {
            ResolveError::NotFound => {
                ApiError::not_found(format!("The model {} does not exist.", clip(model)))
                    .param("model")
                    .code("model_not_found")
            }
            ResolveError::NotReady(m) => {
                ApiError::conflict(m).param("model").code("model_not_ready")
            }
            ResolveError::WrongTask(m) => ApiError::bad_request(m)
                .param("model")
                .code("model_not_supported"),
            ResolveError::Store(e) => e.into(),
        }
    }
}
