//! The web dashboard: a page at `/` and its scripts, styles and the vendored chart
//! library under `/ui/`, all compiled into the binary so `loraforge serve` stays one file
//! that works offline.
//!
//! These routes are not part of the API: they are merged beside it rather than
//! registered through `api::Routes`, so openapi.yaml (and the check that every route is
//! in it) stays about the API alone. They need no API key: the page asks for one when
//! an API call answers 401.

use axum::extract::Path;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use sha2::{Digest, Sha256};
use std::sync::LazyLock;

/// One embedded file.
struct Asset {
    /// Path under `/ui/`.
    path: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

macro_rules! asset {
    ($path:literal, $ty:literal) => {
        Asset {
            path: $path,
            content_type: $ty,
            body: include_bytes!(concat!("../assets/", $path)),
        }
    };
}

const INDEX: Asset = asset!("index.html", "text/html; charset=utf-8");

const ASSETS: [Asset; 6] = [
    asset!("app.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("style.css", "text/css; charset=utf-8"),
    asset!(
        "vendor/uplot/uPlot.iife.min.js",
        "text/javascript; charset=utf-8"
    ),
    asset!("vendor/uplot/uPlot.min.css", "text/css; charset=utf-8"),
    asset!("vendor/uplot/LICENSE", "text/plain; charset=utf-8"),
];

/// Strong ETags from the content, so a browser revalidates cheaply and a new binary's
/// assets are never confused with an old one's (the paths carry no version).
static ETAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
    std::iter::once(&INDEX)
        .chain(ASSETS.iter())
        .map(|a| format!("\"{}\"", hex::encode(&Sha256::digest(a.body)[..16])))
        .collect()
});

/// The page may load only what this server serves, and talk only to it: a second line
/// of defence behind "no external requests".
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
                   img-src 'self' data: blob:; connect-src 'self'; object-src 'none'; \
                   base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// `/` and `/ui/{*path}`; state-free, so it merges into the app's router.
pub fn router<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/", get(index))
        .route("/ui/{*path}", get(ui_asset))
}

async fn index(headers: HeaderMap) -> Response {
    let mut r = respond(&INDEX, &ETAGS[0], &headers);
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

async fn ui_asset(Path(path): Path<String>, headers: HeaderMap) -> Response {
    match ASSETS.iter().position(|a| a.path == path) {
        Some(i) => respond(&ASSETS[i], &ETAGS[i + 1], &headers),
        None => (StatusCode::NOT_FOUND, "no such dashboard file\n").into_response(),
    }
}

fn respond(asset: &Asset, etag: &str, headers: &HeaderMap) -> Response {
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|inm| inm.split(',').any(|t| t.trim() == etag));
    let mut r = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response()
    };
    let h = r.headers_mut();
    // `no-cache` means "revalidate": after an upgrade the page never runs stale scripts,
    // and an unchanged file costs a 304.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The page must reference only files that are embedded (a typo would be a 404 in
    /// the browser), and only same-origin ones.
    #[test]
    fn the_page_references_embedded_assets_only() {
        let html = std::str::from_utf8(INDEX.body).unwrap();
        let mut refs = 0;
        for attr in ["src=\"", "href=\""] {
            for part in html.split(attr).skip(1) {
                let url = &part[..part.find('"').unwrap()];
                if url.starts_with('#') || url.starts_with("data:") {
                    continue;
                }
                let path = url
                    .strip_prefix("/ui/")
                    .unwrap_or_else(|| panic!("{url} is not under /ui/"));
                assert!(
                    ASSETS.iter().any(|a| a.path == path),
                    "{url} is not embedded"
                );
                refs += 1;
            }
        }
        assert!(refs >= 4, "only {refs} asset references found");
    }

    #[test]
    fn etags_differ_per_file() {
        let mut tags = ETAGS.clone();
        tags.sort();
        tags.dedup();
        assert_eq!(tags.len(), ASSETS.len() + 1);
    }
}
