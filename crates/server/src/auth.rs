//! API keys and who a request acts for.
//!
//! A key is `lf-` + 43 random alphanumerics (about 256 bits from the thread-local
//! CSPRNG); the database keeps its sha256 (hex) and a display prefix, never the key.
//! Requests carry `Authorization: Bearer <key>`; the middleware hashes what it is
//! given and looks the hash up, so the comparison is between digests and a key that
//! differs in one letter's case is simply another (unknown) key.
//!
//! Authentication is on when the server has a static `--api-key` (an admin key that
//! lives outside the database) or the database holds a live key. It is decided at
//! start-up and, while off, re-checked every [`RECHECK`]: a key created with
//! `loraforge keys create` while the server runs is enforced within seconds. Once on it
//! stays on until the process restarts, even if every key is revoked (then every `/v1`
//! request is refused), so revoking keys never opens a server.
//!
//! The middleware puts a [`Principal`] into each `/v1` request; handlers filter rows by
//! its [`Principal::owner_filter`], and another owner's row reads as absent (404).

use crate::api::ApiError;
use crate::app::AppState;
use axum::extract::{FromRequestParts, State};
use axum::http::header;
use axum::http::request::Parts;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use loraforge_store::{now_secs, ApiKeyRecord, Store};
use rand::Rng;
use sha2::{Digest, Sha256};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// What every key starts with: tells a loraforge key apart in configs and logs (and
/// lets secret scanners find leaked ones).
pub const KEY_PREFIX: &str = "lf-";
/// Random characters after the prefix: 43 alphanumerics ≈ 256 bits.
const KEY_RANDOM_CHARS: usize = 43;
/// Characters of the key kept as its display prefix (`lf-` + 8).
const DISPLAY_PREFIX_CHARS: usize = 11;
/// How often a server without authentication looks for newly created keys.
pub const RECHECK: Duration = Duration::from_secs(2);
/// `last_used_at` is written at most this often per key.
const TOUCH_EVERY_SECS: i64 = 60;

/// A new random key.
pub fn generate_key() -> String {
    let random: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(KEY_RANDOM_CHARS)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{random}")
}

/// Hex sha256 of a key: what the database stores and looks up.
pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// The part of a key shown in listings.
pub fn display_prefix(key: &str) -> String {
    key.chars().take(DISPLAY_PREFIX_CHARS).collect()
}

/// A new key and the row that records it (hash and prefix only).
pub fn new_key(name: &str, admin: bool) -> (String, ApiKeyRecord) {
    let key = generate_key();
    let record = ApiKeyRecord {
        id: loraforge_store::new_id("key-"),
        name: name.to_string(),
        prefix: display_prefix(&key),
        token_sha256: hash_key(&key),
        created_at: now_secs(),
        last_used_at: None,
        revoked_at: None,
        admin,
    };
    (key, record)
}

/// Who a `/v1` request acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The database key, if the request used one (not with the static `--api-key`, nor
    /// when authentication is off). New rows are stored with it as their owner.
    pub key_id: Option<String>,
    /// Sees and acts on every owner's rows.
    pub admin: bool,
}

impl Principal {
    /// A server without authentication: one user, who sees everything.
    pub fn open() -> Self {
        Principal {
            key_id: None,
            admin: true,
        }
    }

    /// The owner a read must match: `None` (no filter) for admins.
    pub fn owner_filter(&self) -> Option<&str> {
        if self.admin {
            None
        } else {
            // A non-admin always has a key id; fail closed if not.
            Some(self.key_id.as_deref().unwrap_or(""))
        }
    }

    /// The owner recorded on rows this request creates.
    pub fn owner_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }
}

/// Handlers take the principal the middleware attached; without one (a route the
/// middleware did not see) the request is refused rather than served unfiltered.
impl<S: Send + Sync> FromRequestParts<S> for Principal {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<Principal>()
            .cloned()
            .ok_or_else(ApiError::unauthorized)
    }
}

/// The server's authentication settings and state.
#[derive(Debug)]
pub struct Auth {
    /// sha256 of the static `--api-key` (an admin key outside the database).
    static_key: Option<[u8; 32]>,
    /// Whether `/v1` requests need a key. Only ever goes from false to true.
    enforcing: AtomicBool,
    /// Keys' liveness as last read, and when: open streams ask every few seconds, and a
    /// thousand streams of one key should cost one query, not a thousand.
    liveness: std::sync::Mutex<std::collections::HashMap<String, (tokio::time::Instant, bool)>>,
}

impl Auth {
    /// Decides at start-up: on with a static key or a live key in the database.
    pub async fn new(store: &Store, static_key: Option<&str>) -> loraforge_store::Result<Auth> {
        let enforcing = static_key.is_some() || store.has_live_api_keys().await?;
        Ok(Auth {
            static_key: static_key.map(|k| Sha256::digest(k.as_bytes()).into()),
            enforcing: AtomicBool::new(enforcing),
            liveness: Default::default(),
        })
    }

    /// For processes that serve no API (`loraforge worker`).
    pub fn disabled() -> Auth {
        Auth {
            static_key: None,
            enforcing: AtomicBool::new(false),
            liveness: Default::default(),
        }
    }

    /// Whether the database key `id` is still live (not revoked), as read at most `age`
    /// ago. A database error answers `true`: a stream is not cut for an outage.
    pub async fn key_is_live(&self, store: &Store, id: &str, age: std::time::Duration) -> bool {
        let now = tokio::time::Instant::now();
        if let Some((at, live)) = self.liveness.lock().expect("liveness lock").get(id) {
            if now.duration_since(*at) < age {
                return *live;
            }
        }
        let live = store.api_key_is_live(id).await.unwrap_or(true);
        let mut seen = self.liveness.lock().expect("liveness lock");
        // Keys come and go; the map holds those asked about recently.
        seen.retain(|_, (at, _)| now.duration_since(*at) < age * 10);
        seen.insert(id.to_string(), (now, live));
        live
    }

    pub fn enforcing(&self) -> bool {
        self.enforcing.load(Ordering::SeqCst)
    }

    /// While off, looks for a live key every [`RECHECK`] and turns on when one appears.
    pub fn watch_for_keys(
        self: &std::sync::Arc<Self>,
        store: Store,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        if self.enforcing() {
            return;
        }
        let auth = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(RECHECK) => {}
                }
                match store.has_live_api_keys().await {
                    Ok(true) => {
                        auth.enforcing.store(true, Ordering::SeqCst);
                        tracing::info!("an API key exists now: authentication is enforced");
                        return;
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(error = %e, "could not check for API keys"),
                }
            }
        });
    }

    /// Who `token` is, or `None` for a wrong or revoked key.
    async fn authenticate(
        &self,
        store: &Store,
        token: &str,
    ) -> Result<Option<Principal>, ApiError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if self.static_key.as_ref() == Some(&digest) {
            return Ok(Some(Principal {
                key_id: None,
                admin: true,
            }));
        }
        let Some(key) = store.find_api_key(&hex::encode(digest)).await? else {
            return Ok(None);
        };
        let now = now_secs();
        if key.last_used_at.is_none_or(|t| now - t >= TOUCH_EVERY_SECS) {
            // Bookkeeping only: a failed write does not fail the request.
            if let Err(e) = store.touch_api_key(&key.id, now).await {
                tracing::warn!(key_id = %key.id, error = %e, "could not record a key's use");
            }
        }
        Ok(Some(Principal {
            key_id: Some(key.id),
            admin: key.admin,
        }))
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme's case does not
/// matter, the token's does).
fn bearer(parts: &axum::http::HeaderMap) -> Option<&str> {
    let v = parts.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// Authenticates `/v1` requests (health checks, the spec and the dashboard shell stay
/// open) and attaches their [`Principal`]. A missing, wrong or revoked key is a 401.
pub async fn require_api_key(
    State(state): State<AppState>,
    mut req: axum::extract::Request,
    next: Next,
) -> Response {
    if !req.uri().path().starts_with("/v1/") {
        return next.run(req).await;
    }
    let principal = if state.auth.enforcing() {
        let Some(token) = bearer(req.headers()) else {
            return ApiError::unauthorized().into_response();
        };
        match state.auth.authenticate(&state.store, token).await {
            Ok(Some(p)) => p,
            Ok(None) => return ApiError::unauthorized().into_response(),
            Err(e) => return e.into_response(),
        }
    } else {
        // Without authentication a bearer token (the openai client always sends one)
        // is ignored.
        Principal::open()
    };
    req.extensions_mut().insert(principal);
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_prefixed_and_hashed() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX));
        assert_eq!(a.len(), KEY_PREFIX.len() + KEY_RANDOM_CHARS);
        assert!(a[KEY_PREFIX.len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(hash_key(&a).len(), 64);
        assert_ne!(hash_key(&a), hash_key(&a.to_uppercase()));
        assert_eq!(display_prefix(&a), a[..11]);
    }

    #[test]
    fn bearer_scheme_is_case_insensitive_token_is_not() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::AUTHORIZATION, "bearer lf-AbC".parse().unwrap());
        assert_eq!(bearer(&h), Some("lf-AbC"));
        h.insert(header::AUTHORIZATION, "Basic xyz".parse().unwrap());
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer ".parse().unwrap());
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn owner_filters() {
        assert_eq!(Principal::open().owner_filter(), None);
        let k = Principal {
            key_id: Some("key-1".into()),
            admin: false,
        };
        assert_eq!(k.owner_filter(), Some("key-1"));
        assert_eq!(k.owner_id(), Some("key-1"));
        let a = Principal {
            key_id: Some("key-2".into()),
            admin: true,
        };
        assert_eq!(a.owner_filter(), None);
        assert_eq!(a.owner_id(), Some("key-2"));
    }
}
