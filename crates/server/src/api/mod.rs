//! The HTTP API: routes, request and response shapes, errors.
//!
//! Routes are registered through [`Routes`], which records each method and path as
//! it adds it, so the route table that the OpenAPI test checks is the router itself.

pub mod audio;
pub mod chat;
pub mod error;
pub mod exports;
pub mod files;
pub mod jobs;
pub mod models;
pub mod workers;

pub use error::{clip, ApiError, ApiResult};

use crate::app::AppState;
use axum::extract::{DefaultBodyLimit, FromRequestParts, Query, State};
use axum::handler::Handler;
use axum::http::request::Parts;
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

/// The contract, served at `GET /openapi.yaml`.
pub const OPENAPI_YAML: &str = include_str!("../../../../openapi.yaml");

/// One registered route, e.g. `("get", "/v1/files/{file_id}")`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteSpec {
    pub method: String,
    pub path: &'static str,
}

struct Routes {
    router: Router<AppState>,
    table: Vec<RouteSpec>,
}

impl Routes {
    fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone()).expect("a routable method");
        self.router = self.router.route(path, on(filter, handler));
        self.table.push(RouteSpec {
            method: method.as_str().to_ascii_lowercase(),
            path,
        });
        self
    }
}

/// Every route, and the table of what was registered.
pub fn router() -> (Router<AppState>, Vec<RouteSpec>) {
    let r = Routes {
        router: Router::new(),
        table: Vec::new(),
    }
    .add(Method::GET, "/healthz", healthz)
    .add(Method::GET, "/readyz", readyz)
    .add(Method::GET, "/openapi.yaml", openapi)
    .add(Method::POST, "/v1/files", files::create)
    .add(Method::GET, "/v1/files", files::list)
    .add(Method::GET, "/v1/files/{file_id}", files::retrieve)
    .add(Method::DELETE, "/v1/files/{file_id}", files::delete)
    .add(Method::GET, "/v1/files/{file_id}/content", files::content)
    .add(Method::POST, "/v1/chat/completions", chat::chat_completions)
    .add(Method::POST, "/v1/completions", chat::completions)
    .add(
        Method::POST,
        "/v1/audio/transcriptions",
        audio::transcriptions,
    )
    .add(Method::GET, "/v1/models", models::list)
    .add(Method::GET, "/v1/models/{model}", models::retrieve)
    .add(Method::DELETE, "/v1/models/{model}", models::delete)
    .add(Method::GET, "/v1/workers", workers::list)
    .add(Method::POST, "/v1/fine_tuning/jobs", jobs::create)
    .add(Method::GET, "/v1/fine_tuning/jobs", jobs::list)
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}",
        jobs::retrieve,
    )
    .add(
        Method::POST,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/cancel",
        jobs::cancel,
    )
    .add(
        Method::POST,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/pause",
        jobs::pause,
    )
    .add(
        Method::POST,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/resume",
        jobs::resume,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/events",
        jobs::events,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints",
        jobs::checkpoints,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/checkpoints/{checkpoint_id}/adapter",
        jobs::checkpoint_adapter,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/adapter",
        jobs::adapter,
    )
    .add(
        Method::POST,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
        exports::create,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports",
        exports::list,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports/{export_id}",
        exports::retrieve,
    )
    .add(
        Method::DELETE,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports/{export_id}",
        exports::delete,
    )
    .add(
        Method::GET,
        "/v1/fine_tuning/jobs/{fine_tuning_job_id}/exports/{export_id}/content",
        exports::content,
    );
    let router = r
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        // The upload route streams under its own cap and JSON routes read through
        // `json_body` under theirs; axum's 2 MB default would cut uploads short.
        .layer(DefaultBodyLimit::disable());
    (router, r.table)
}

/// Reads a JSON request body of at most `--max-json-bytes`; a bigger one is a 413
/// before more than the cap is read.
pub async fn json_body(state: &AppState, body: axum::body::Body) -> ApiResult<bytes::Bytes> {
    let cap = state.settings.max_json_bytes;
    axum::body::to_bytes(body, cap).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("The request body exceeds the maximum of {cap} bytes for JSON requests."),
        )
        .code("request_too_large")
    })
}

/// Bounds the time a request takes to produce its response head. Streamed bodies (SSE,
/// downloads, streamed chat) flow on after the head and are not cut; uploads read their
/// whole body before answering, so `POST /v1/files` is exempt.
pub async fn request_timeout(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    bounded(state.settings.request_timeout, req, next).await
}

async fn bounded(limit: std::time::Duration, req: axum::extract::Request, next: Next) -> Response {
    let upload = req.method() == Method::POST && req.uri().path() == "/v1/files";
    if limit.is_zero() || upload {
        return next.run(req).await;
    }
    match tokio::time::timeout(limit, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            format!(
                "The request took longer than {} s (--request-timeout-seconds).",
                limit.as_secs()
            ),
        )
        .code("timeout")
        .into_response(),
    }
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!("Invalid URL ({method} {})", uri.path())).code("unknown_url")
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("Method {method} is not allowed on {}", uri.path()),
    )
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready when the database answers.
async fn readyz(State(state): State<AppState>) -> ApiResult<Json<serde_json::Value>> {
    match tokio::time::timeout(std::time::Duration::from_secs(3), state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ready" }))),
        Ok(Err(e)) => Err(ApiError::unavailable(e)),
        Err(_) => Err(ApiError::unavailable("database ping timed out")),
    }
}

async fn openapi() -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/yaml"),
        )],
        OPENAPI_YAML,
    )
}

/// `Query` whose rejection is our JSON error, not axum's plain text.
pub struct ApiQuery<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        Query::<T>::from_request_parts(parts, state)
            .await
            .map(|Query(v)| ApiQuery(v))
            .map_err(|e| ApiError::bad_request(e.body_text()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn spec_operations() -> BTreeSet<(String, String)> {
        let spec: serde_yaml::Value = serde_yaml::from_str(OPENAPI_YAML).unwrap();
        let paths = spec["paths"].as_mapping().expect("paths");
        let mut out = BTreeSet::new();
        for (path, item) in paths {
            for (method, _) in item.as_mapping().unwrap() {
                let m = method.as_str().unwrap();
                if ["get", "post", "put", "patch", "delete", "head", "options"].contains(&m) {
                    out.insert((m.to_string(), path.as_str().unwrap().to_string()));
                }
            }
        }
        out
    }

    /// Fails when a route is added without describing it in openapi.yaml, or when
    /// the spec describes a route that does not exist.
    #[test]
    fn every_route_is_in_openapi_yaml_and_back() {
        let (_, table) = router();
        let routes: BTreeSet<(String, String)> = table
            .iter()
            .map(|r| (r.method.clone(), r.path.to_string()))
            .collect();
        assert_eq!(routes.len(), table.len(), "a route is registered twice");
        let spec = spec_operations();
        let missing: Vec<_> = routes.difference(&spec).collect();
        assert!(
            missing.is_empty(),
            "routes missing from openapi.yaml: {missing:?}"
        );
        let extra: Vec<_> = spec.difference(&routes).collect();
        assert!(
            extra.is_empty(),
            "openapi.yaml describes unknown routes: {extra:?}"
        );
    }
}

#[cfg(test)]
mod timeout_tests {
    use super::*;
    use axum::routing::{get, post};
    use std::time::Duration;
    use tower::ServiceExt;

    async fn slow() -> &'static str {
        tokio::time::sleep(Duration::from_millis(400)).await;
        "done"
    }

    fn app() -> Router {
        Router::new()
            .route("/slow", get(slow))
            .route("/v1/files", post(slow))
            .layer(axum::middleware::from_fn(|req, next| {
                bounded(Duration::from_millis(100), req, next)
            }))
    }

    fn req(m: Method, p: &str) -> axum::http::Request<axum::body::Body> {
        axum::http::Request::builder()
            .method(m)
            .uri(p)
            .body(axum::body::Body::empty())
            .unwrap()
    }

    #[tokio::test]
    async fn slow_requests_time_out_but_uploads_do_not() {
        let r = app().oneshot(req(Method::GET, "/slow")).await.unwrap();
        assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "timeout", "{v}");
        let r = app().oneshot(req(Method::POST, "/v1/files")).await.unwrap();
        assert_eq!(r.status(), StatusCode::OK);
    }
}
