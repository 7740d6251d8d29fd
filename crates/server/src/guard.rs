//! What keeps a browser from driving the API on a user's behalf.
//!
//! Without keys, a server on a loopback address trusts whoever can reach it, and a web
//! page can: a cross-site form POST reaches it (CSRF), and a page whose domain is made to
//! resolve to 127.0.0.1 reads it (DNS rebinding). So `/v1` refuses, with 403:
//! - a request whose `Host` is not one of this server's names when it runs without keys
//!   on a loopback address (`--allowed-hosts` adds names, e.g. behind a proxy);
//! - a browser's cross-site request (an `Origin` other than the server's own and those
//!   `--cors-origins` allows, or `Sec-Fetch-Site: cross-site` without an `Origin`);
//!
//! and with 415 a JSON endpoint's body sent as anything but JSON (a form cannot send
//! `application/json` across sites without a CORS preflight).

use crate::api::{clip, ApiError};
use crate::app::AppState;
use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

/// What the guard needs from the configuration.
#[derive(Debug, Clone, Default)]
pub struct Guard {
    /// The server listens on a loopback address.
    pub loopback: bool,
    /// Host names (without port) accepted besides the loopback names.
    pub allowed_hosts: Vec<String>,
    /// Origins allowed by CORS (`*`: any).
    pub cors_origins: Vec<String>,
}

const LOOPBACK_NAMES: [&str; 4] = ["localhost", "127.0.0.1", "[::1]", "::1"];

/// The host part of a `Host` header value or of an origin's authority.
fn host_of(authority: &str) -> &str {
    if authority.starts_with('[') {
        return authority
            .split_once(']')
            .map_or(authority, |(h, _)| h)
            .trim_start_matches('[');
    }
    authority.rsplit_once(':').map_or(authority, |(h, _)| h)
}

impl Guard {
    fn host_allowed(&self, host: &str) -> bool {
        let h = host_of(host).to_ascii_lowercase();
        LOOPBACK_NAMES
            .iter()
            .any(|n| n.trim_matches(['[', ']']) == h)
            || self
                .allowed_hosts
                .iter()
                .any(|a| host_of(a).eq_ignore_ascii_case(&h))
    }

    fn origin_allowed(&self, origin: &str, host: Option<&str>) -> bool {
        if self.cors_origins.iter().any(|o| o == "*" || o == origin) {
            return true;
        }
        // Same origin: the page was served by this server, under the name it used.
        let authority = origin.split_once("://").map(|(_, a)| a);
        matches!((authority, host), (Some(a), Some(h)) if a.eq_ignore_ascii_case(h))
    }

    /// Why a request is refused, if it is.
    fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
        open: bool,
    ) -> Option<ApiError> {
        let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
        let host = text(header::HOST);
        if open && self.loopback {
            if let Some(h) = host.filter(|h| !self.host_allowed(h)) {
                return Some(
                    ApiError::new(
                        StatusCode::FORBIDDEN,
                        format!(
                            "Host {} is not a name of this server; it runs without keys on a \
                             loopback address, so it answers only to localhost and the names \
                             in --allowed-hosts.",
                            clip(h)
                        ),
                    )
                    .code("host_not_allowed"),
                );
            }
        }
        match text(header::ORIGIN) {
            Some(o) if !self.origin_allowed(o, host) => {
                return Some(cross_site(&format!("origin {}", clip(o))));
            }
            None if headers
                .get("sec-fetch-site")
                .is_some_and(|v| v == "cross-site")
                && !self.cors_origins.iter().any(|o| o == "*") =>
            {
                return Some(cross_site("another site"));
            }
            _ => {}
        }
        let writes = matches!(*method, Method::POST | Method::PUT | Method::PATCH);
        let has_body = headers.contains_key(header::TRANSFER_ENCODING)
            || text(header::CONTENT_LENGTH).is_some_and(|n| n != "0");
        let json = text(header::CONTENT_TYPE).is_some_and(|t| {
            let t = t
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            t == "application/json" || t.ends_with("+json")
        });
        // Uploads have their own content types (JSONL, multipart, octet-stream), and
        // audio for transcription comes as OpenAI's multipart form; browsers from other
        // origins were refused above.
        let upload = path == "/v1/files" || path == "/v1/audio/transcriptions";
        if writes && has_body && !json && !upload {
            return Some(
                ApiError::new(
                    StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "Send this request's body as JSON (Content-Type: application/json).",
                )
                .code("unsupported_media_type"),
            );
        }
        None
    }
}

fn cross_site(from: &str) -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        format!(
            "A browser request from {from} is refused: add the origin to --cors-origins to \
             let a web page there use this API."
        ),
    )
    .code("cross_site_request")
}

/// The middleware: `/v1` requests only (the dashboard is same-origin by construction).
pub async fn browser_guard(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: Next,
) -> Response {
    let path = req.uri().path();
    if path.starts_with("/v1/") {
        let open = !state.auth.enforcing();
        if let Some(e) = state
            .settings
            .guard
            .check(req.method(), path, req.headers(), open)
        {
            return e.into_response();
        }
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn hosts_origins_and_content_types() {
        let g = Guard {
            loopback: true,
            allowed_hosts: vec!["lf.internal".into()],
            cors_origins: vec!["http://app.example".into()],
        };
        let get = |h: &[(&'static str, &str)], open| {
            g.check(&Method::GET, "/v1/files", &headers(h), open)
        };
        // Loopback names and --allowed-hosts pass; others only when keys are required.
        assert!(get(&[("host", "127.0.0.1:8080")], true).is_none());
        assert!(get(&[("host", "localhost:8080")], true).is_none());
        assert!(get(&[("host", "[::1]:8080")], true).is_none());
        assert!(get(&[("host", "lf.internal:80")], true).is_none());
        assert!(get(&[("host", "evil.example:8080")], true).is_some());
        assert!(get(&[("host", "evil.example:8080")], false).is_none());
        // Same origin, or a CORS origin; nothing else from a browser.
        let h = "127.0.0.1:8080";
        assert!(get(&[("host", h), ("origin", "http://127.0.0.1:8080")], true).is_none());
        assert!(get(&[("host", h), ("origin", "http://app.example")], true).is_none());
        assert!(get(&[("host", h), ("origin", "http://evil.example")], false).is_some());
        assert!(get(&[("host", h), ("origin", "null")], false).is_some());
        assert!(get(&[("host", h), ("sec-fetch-site", "cross-site")], false).is_some());
        assert!(get(&[("host", h), ("sec-fetch-site", "same-origin")], false).is_none());
        // JSON endpoints take JSON bodies; bodiless POSTs and uploads are left alone.
        let post =
            |path, h: &[(&'static str, &str)]| g.check(&Method::POST, path, &headers(h), false);
        let form = [
            ("host", h),
            ("content-type", "text/plain"),
            ("content-length", "10"),
        ];
        assert!(post("/v1/fine_tuning/jobs", &form).is_some());
        assert!(post("/v1/files", &form).is_none());
        assert!(post("/v1/fine_tuning/jobs/x/cancel", &[("host", h)]).is_none());
        let json = [
            ("host", h),
            ("content-type", "application/json; charset=utf-8"),
            ("content-length", "2"),
        ];
        assert!(post("/v1/fine_tuning/jobs", &json).is_none());
    }
}
