//! Wiring: state, storage set-up, the middleware stack, and the server's life cycle.

use crate::auth::Auth;
use crate::config::{KeysCommand, LogArgs, MigrateArgs, ModelsArgs, ServeArgs, StorageArgs};
use anyhow::Context;
use axum::http::{header, HeaderName, HeaderValue, Method, Request};
use axum::Router;
use loraforge_store::{BlobStore, Store};
use std::path::PathBuf;
use std::sync::Arc;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::{DefaultOnResponse, TraceLayer};

/// What every handler can reach; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Store,
    pub blobs: BlobStore,
    pub settings: Arc<Settings>,
    /// Whether `/v1` needs a key, and the static admin key.
    pub auth: Arc<Auth>,
    /// Wakes idle workers when a job is created, so they need not wait for their next poll.
    pub jobs_notify: Arc<tokio::sync::Notify>,
    /// Models and adapters loaded for chat/completions.
    pub engine: Arc<crate::inference::Engine>,
    /// Cancelled on SIGTERM/SIGINT: event streams end, workers stop claiming and hand
    /// their running jobs back.
    pub shutdown: tokio_util::sync::CancellationToken,
    /// The shared pollers behind the jobs' event streams.
    pub feeds: Arc<crate::feeds::Feeds>,
    /// Bumped when a pause or cancel is requested here, so this process's running jobs
    /// look now instead of at their next heartbeat (a watch, so a worker busy at that
    /// moment still sees it).
    pub job_control: Arc<tokio::sync::watch::Sender<u64>>,
}

/// The parts of the configuration that handlers need.
#[derive(Debug)]
pub struct Settings {
    pub models_dir: PathBuf,
    /// The local data directory (database, temp files, the workers' job folders).
    pub data_dir: PathBuf,
    pub max_upload_bytes: u64,
    pub min_examples: u64,
    /// Largest JSON request body.
    pub max_json_bytes: usize,
    /// Largest pipeline whose text-to-image jobs CPU workers may take.
    pub cpu_image_max_params: u64,
    /// Most queued or running jobs per owner (0: no cap).
    pub max_active_jobs_per_owner: u64,
    /// Most stored file bytes per owner (0: no cap).
    pub max_stored_bytes_per_owner: u64,
    /// Longest time to a response head (zero: none).
    pub request_timeout: std::time::Duration,
    /// Which browsers' requests `/v1` refuses (see `guard`).
    pub guard: crate::guard::Guard,
    /// How long an upload may send nothing (zero: no limit).
    pub upload_idle_timeout: std::time::Duration,
}

pub fn init_tracing(log: &LogArgs) -> anyhow::Result<()> {
    let filter = tracing_subscriber::EnvFilter::try_new(&log.log)
        .with_context(|| format!("invalid log filter {:?}", log.log))?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    let res = if log.log_json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
    res.map_err(|e| anyhow::anyhow!("tracing: {e}"))
}

/// Connects to the database (creating the data directory for SQLite) and migrates it.
async fn open_store(s: &StorageArgs) -> anyhow::Result<Store> {
    std::fs::create_dir_all(&s.data_dir)
        .with_context(|| format!("creating data directory {}", s.data_dir.display()))?;
    let store = match &s.database_url {
        Some(url) => Store::connect(url).await,
        None => Store::connect_sqlite_file(&s.data_dir.join("loraforge.db")).await,
    }
    .context("connecting to the database")?;
    store.migrate().await.context("applying migrations")?;
    Ok(store)
}

fn open_blobs(s: &StorageArgs) -> anyhow::Result<BlobStore> {
    let tmp = s.data_dir.join("tmp");
    match &s.storage_url {
        Some(url) => BlobStore::from_url(url, &tmp),
        None => BlobStore::local(&s.data_dir.join("blobs"), &tmp),
    }
    .context("opening blob storage")
}

pub async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let store = open_store(&args.storage).await?;
    tracing::info!(backend = ?store.backend(), "migrations applied");
    store.close().await;
    Ok(())
}

/// `loraforge keys create | list | revoke`.
pub async fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create(a) => {
            let name = a.name.trim();
            if name.is_empty() {
                anyhow::bail!("--name must not be empty");
            }
            let store = open_store(&a.storage).await?;
            let (key, record) = crate::auth::new_key(name, a.admin);
            store
                .insert_api_key(&record)
                .await
                .context("storing the key")?;
            store.close().await;
            // The key alone on stdout (KEY=$(loraforge keys create ...)); the rest on stderr.
            println!("{key}");
            eprintln!(
                "created {}key {} ({:?}, prefix {}). This is the only time the key is shown: \
                 store it now. Send it as `Authorization: Bearer <key>`.",
                if record.admin { "admin " } else { "" },
                record.id,
                record.name,
                record.prefix
            );
            Ok(())
        }
        KeysCommand::List(a) => {
            let store = open_store(&a.storage).await?;
            let keys = store.list_api_keys().await?;
            store.close().await;
            let when = |t: Option<i64>| {
                t.and_then(|t| chrono::DateTime::from_timestamp(t, 0))
                    .map(|d| d.format("%Y-%m-%d %H:%M:%SZ").to_string())
                    .unwrap_or_else(|| "-".into())
            };
            if a.json {
                let rows: Vec<_> = keys
                    .iter()
                    .map(|k| {
                        serde_json::json!({
                            "id": k.id, "name": k.name, "prefix": k.prefix, "admin": k.admin,
                            "created_at": k.created_at, "last_used_at": k.last_used_at,
                            "revoked_at": k.revoked_at,
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string_pretty(&rows)?);
                return Ok(());
            }
            println!(
                "{:<28} {:<20} {:<12} {:<6} {:<21} {:<21} REVOKED",
                "ID", "NAME", "PREFIX", "ADMIN", "CREATED", "LAST USED"
            );
            for k in &keys {
                println!(
                    "{:<28} {:<20} {:<12} {:<6} {:<21} {:<21} {}",
                    k.id,
                    k.name,
                    k.prefix,
                    if k.admin { "yes" } else { "no" },
                    when(Some(k.created_at)),
                    when(k.last_used_at),
                    when(k.revoked_at),
                );
            }
            Ok(())
        }
        KeysCommand::Revoke(a) => {
            let store = open_store(&a.storage).await?;
            let keys = store.list_api_keys().await?;
            let matches: Vec<_> = keys
                .iter()
                .filter(|k| k.id == a.key || k.prefix == a.key)
                .collect();
            let key = match matches.as_slice() {
                [] => anyhow::bail!(
                    "no key with id or prefix {:?} (see `loraforge keys list`)",
                    a.key
                ),
                [k] => *k,
                _ => anyhow::bail!(
                    "{} keys have the prefix {:?}: revoke by id ({})",
                    matches.len(),
                    a.key,
                    matches
                        .iter()
                        .map(|k| k.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            };
            if key.revoked_at.is_some() {
                anyhow::bail!("key {} is already revoked", key.id);
            }
            store.revoke_api_key(&key.id).await?;
            store.close().await;
            eprintln!(
                "revoked key {} ({:?}, prefix {})",
                key.id, key.name, key.prefix
            );
            Ok(())
        }
    }
}

pub fn list_models(args: ModelsArgs) -> anyhow::Result<()> {
    let models = loraforge_trainer::families::scan(&args.models_dir);
    if args.json {
        let objs: Vec<_> = models
            .iter()
            .map(crate::api::models::model_object)
            .collect();
        println!("{}", serde_json::to_string_pretty(&objs)?);
        return Ok(());
    }
    if models.is_empty() {
        eprintln!("no models in {}", args.models_dir.display());
        return Ok(());
    }
    println!(
        "{:<40} {:<8} {:<12} {:>14} {:<6} {:>10} {:>8}  TRAINABLE",
        "ID", "FORMAT", "ARCH", "PARAMETERS", "DTYPE", "TRAIN MEM", "CONTEXT"
    );
    for m in &models {
        let format = serde_json::to_value(m.format)?;
        println!(
            "{:<40} {:<8} {:<12} {:>14} {:<6} {:>10} {:>8}  {}{}",
            m.id,
            format.as_str().unwrap_or("?"),
            m.architecture,
            m.parameters,
            m.weights_dtype.as_deref().unwrap_or("-"),
            m.training_memory_bytes
                .map(|b| format!("{:.1} GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or("-".into()),
            m.context_length
                .map(|c| c.to_string())
                .unwrap_or("-".into()),
            if m.trainable { "yes" } else { "no" },
            m.note
                .as_deref()
                .map(|n| format!(" ({n})"))
                .unwrap_or_default(),
        );
    }
    Ok(())
}

fn cors_layer(origins: &[String]) -> anyhow::Result<Option<CorsLayer>> {
    let origins: Vec<&str> = origins
        .iter()
        .map(|s| s.trim())
        .filter(|s| !s.is_empty())
        .collect();
    if origins.is_empty() {
        return Ok(None);
    }
    let allow = if origins.contains(&"*") {
        AllowOrigin::any()
    } else {
        let list = origins
            .iter()
            .map(|o| HeaderValue::from_str(o).with_context(|| format!("bad CORS origin {o:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        AllowOrigin::list(list)
    };
    Ok(Some(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods([Method::GET, Method::POST, Method::DELETE, Method::OPTIONS])
            .allow_headers([
                header::AUTHORIZATION,
                header::CONTENT_TYPE,
                HeaderName::from_static("last-event-id"),
            ])
            .expose_headers([HeaderName::from_static("x-request-id")]),
    ))
}

/// Where a client's own `X-Request-Id` goes: logged beside ours, never taken for it.
const CLIENT_REQUEST_ID: &str = "x-client-request-id";

/// Moves a client's `X-Request-Id` aside, so that the id in our logs and answers is
/// always one we made (a client could otherwise forge the id of another request).
async fn set_aside_client_request_id(
    mut req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if let Some(v) = req.headers_mut().remove("x-request-id") {
        req.headers_mut().insert(CLIENT_REQUEST_ID, v);
    }
    next.run(req).await
}

/// `/v1` answers are a tenant's data: never sniffed as another type, never stored by a
/// cache (an event stream keeps its own `no-cache`).
async fn api_headers(
    req: Request<axum::body::Body>,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let api = req.uri().path().starts_with("/v1/");
    let mut resp = next.run(req).await;
    if api {
        let h = resp.headers_mut();
        h.insert(
            axum::http::header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        );
        h.entry(axum::http::header::CACHE_CONTROL)
            .or_insert(HeaderValue::from_static("no-store"));
    }
    resp
}

/// The API and the dashboard with their middleware: request ids (set, logged,
/// returned), tracing, CORS.
pub fn build_app(state: AppState, cors_origins: &[String]) -> anyhow::Result<Router> {
    let (router, _) = crate::api::router();
    let router = router
        .merge(crate::dashboard::router())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::auth::require_api_key,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::guard::browser_guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::api::request_timeout,
        ))
        .with_state(state)
        .layer(axum::middleware::from_fn(api_headers))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request<_>| {
                    let header = |name: &str| {
                        req.headers()
                            .get(name)
                            .and_then(|v| v.to_str().ok())
                            .map(|v| v.chars().take(128).collect::<String>())
                    };
                    let id = header("x-request-id").unwrap_or_else(|| "-".into());
                    let span = tracing::info_span!(
                        "request",
                        method = %req.method(),
                        path = %req.uri().path(),
                        request_id = %id,
                        client_request_id = tracing::field::Empty,
                    );
                    if let Some(client) = header(CLIENT_REQUEST_ID) {
                        span.record("client_request_id", client.as_str());
                    }
                    span
                })
                // One line per request at info: an access log with status and latency.
                .on_response(DefaultOnResponse::new().level(tracing::Level::INFO)),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::from_fn(set_aside_client_request_id));
    Ok(match cors_layer(cors_origins)? {
        Some(cors) => router.layer(cors),
        None => router,
    })
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let store = open_store(&args.storage).await?;
    let blobs = open_blobs(&args.storage)?;
    let auth = Arc::new(
        // An empty value (e.g. `LORAFORGE_API_KEY=` from a compose file) is no key.
        Auth::new(&store, args.api_key.as_deref().filter(|k| !k.is_empty()))
            .await
            .context("looking for API keys")?,
    );
    // Bind first: whether running without keys is allowed depends on where we listen.
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("binding {}:{}", args.host, args.port))?;
    let addr = listener.local_addr()?;
    check_open_bind(auth.enforcing(), addr, args.insecure_no_auth)?;
    let swept = blobs.sweep_tmp().context("sweeping the temp directory")?;
    if swept > 0 {
        tracing::info!(files = swept, "removed temp files left by an earlier run");
    }
    let state = AppState {
        store: store.clone(),
        blobs,
        settings: Arc::new(Settings {
            models_dir: args.models_dir.clone(),
            data_dir: args.storage.data_dir.clone(),
            max_upload_bytes: args.max_upload_bytes,
            min_examples: args.min_examples,
            max_json_bytes: args.max_json_bytes,
            max_active_jobs_per_owner: args.max_active_jobs_per_owner,
            cpu_image_max_params: args.cpu_image_max_params,
            max_stored_bytes_per_owner: args.max_stored_bytes_per_owner,
            request_timeout: std::time::Duration::from_secs(args.request_timeout_seconds),
            upload_idle_timeout: std::time::Duration::from_secs(args.upload_idle_seconds),
            guard: crate::guard::Guard {
                loopback: addr.ip().is_loopback(),
                allowed_hosts: args.allowed_hosts.clone(),
                cors_origins: args.cors_origins.clone(),
            },
        }),
        auth: auth.clone(),
        jobs_notify: Arc::new(tokio::sync::Notify::new()),
        engine: Arc::new(crate::inference::Engine::new(&args.storage.data_dir)),
        shutdown: tokio_util::sync::CancellationToken::new(),
        feeds: Arc::new(crate::feeds::Feeds::default()),
        job_control: Arc::new(tokio::sync::watch::Sender::new(0)),
    };
    let workers = crate::worker::spawn(state.clone(), &args.workers, &args.storage.data_dir);
    let shutdown = state.shutdown.clone();
    auth.watch_for_keys(store.clone(), shutdown.clone());
    let app = build_app(state, &args.cors_origins)?;
    tracing::info!(%addr, backend = ?store.backend(), "listening");
    // The one line on stdout: scripts and tests read the bound address from it.
    println!("loraforge listening on http://{addr}");
    let token = shutdown.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        exit_on_second_signal();
        token.cancel();
    });
    serve_http(
        listener,
        app,
        shutdown.clone(),
        std::time::Duration::from_secs(args.header_timeout_seconds),
    )
    .await;
    drain_workers(workers).await;
    store.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Secure by default: without any key, serving is allowed on a loopback address (with a
/// warning), and elsewhere only with `--insecure-no-auth`.
fn check_open_bind(
    enforcing: bool,
    addr: std::net::SocketAddr,
    insecure_no_auth: bool,
) -> anyhow::Result<()> {
    if enforcing {
        tracing::info!("authentication enforced: /v1 requests need an API key");
        return Ok(());
    }
    if addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "running without authentication: no API key exists and no --api-key was given, \
             so anyone who can reach this loopback address can use the API; \
             create a key with `loraforge keys create --name NAME` to require keys"
        );
        return Ok(());
    }
    if insecure_no_auth {
        tracing::warn!(
            %addr,
            "running without authentication on a non-loopback address (--insecure-no-auth): \
             anyone who can reach it can use the API"
        );
        return Ok(());
    }
    anyhow::bail!(
        "refusing to serve on {addr} without authentication: no API key exists and no \
         --api-key was given. Create a key with `loraforge keys create --name NAME` (or pass \
         --api-key), listen on a loopback address (--host 127.0.0.1), or pass \
         --insecure-no-auth to run open anyway"
    )
}

/// How long running jobs get to checkpoint and go back to the queue after a signal.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(8);

/// Serves `app` over HTTP/1.1 until `shutdown`: each connection has `header_timeout` to
/// send a request's headers (a slowloris client holds no connection for long; zero: no
/// limit). Then requests in flight get [`DRAIN`] to finish; one still open after that (a
/// stalled upload) is dropped with its connection, and its temp file with it.
async fn serve_http(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: tokio_util::sync::CancellationToken,
    header_timeout: std::time::Duration,
) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new());
    if !header_timeout.is_zero() {
        http.header_read_timeout(header_timeout);
    }
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let app = app.clone();
        let service = hyper::service::service_fn(move |req| app.clone().oneshot(req));
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(DRAIN) => tracing::warn!(
            "requests still open {DRAIN:?} after the signal; closing their connections"
        ),
    }
}

/// From the first signal on, a second one ends the process at once, wherever the
/// drain is (requests or workers).
fn exit_on_second_signal() {
    tokio::spawn(async {
        shutdown_signal().await;
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
}

/// Waits (bounded) for the workers to hand their jobs back.
async fn drain_workers(workers: Vec<tokio::task::JoinHandle<()>>) {
    if tokio::time::timeout(DRAIN, futures::future::join_all(workers))
        .await
        .is_err()
    {
        tracing::warn!(
            "workers did not stop in time; their jobs are re-claimed when the leases expire"
        );
    }
}

/// `loraforge worker`: claims and trains jobs from the shared database until a signal.
/// Datasets, checkpoints and adapters go through the blob store, so this process needs
/// only the database URL, the store URL and the models.
pub async fn worker(args: crate::config::WorkerCmdArgs) -> anyhow::Result<()> {
    let store = open_store(&args.storage).await?;
    let blobs = open_blobs(&args.storage)?;
    let state = AppState {
        store: store.clone(),
        blobs,
        settings: Arc::new(Settings {
            models_dir: args.models_dir.clone(),
            data_dir: args.storage.data_dir.clone(),
            max_upload_bytes: 0,
            min_examples: 1,
            max_json_bytes: 0,
            max_active_jobs_per_owner: 0,
            cpu_image_max_params: 0,
            max_stored_bytes_per_owner: 0,
            request_timeout: std::time::Duration::ZERO,
            guard: Default::default(),
            upload_idle_timeout: std::time::Duration::ZERO,
        }),
        auth: Arc::new(Auth::disabled()),
        jobs_notify: Arc::new(tokio::sync::Notify::new()),
        engine: Arc::new(crate::inference::Engine::new(&args.storage.data_dir)),
        shutdown: tokio_util::sync::CancellationToken::new(),
        feeds: Arc::new(crate::feeds::Feeds::default()),
        job_control: Arc::new(tokio::sync::watch::Sender::new(0)),
    };
    let devices: Vec<String> = args
        .workers
        .devices
        .iter()
        .filter(|d| d.trim() != "none")
        .cloned()
        .collect();
    if devices.is_empty() {
        anyhow::bail!("--devices names no device: a worker process needs at least one");
    }
    let shutdown = state.shutdown.clone();
    let workers = crate::worker::spawn(state, &args.workers, &args.storage.data_dir);
    println!("loraforge worker running on {}", devices.join(","));
    shutdown_signal().await;
    exit_on_second_signal();
    shutdown.cancel();
    drain_workers(workers).await;
    store.close().await;
    Ok(())
}

/// Resolves on SIGINT or SIGTERM; in-flight requests then finish before exit.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    tracing::info!("shutdown signal received; draining requests");
}
