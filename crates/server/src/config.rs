//! Command-line flags of `serve`, `migrate` and `models`; every flag has a
//! `LORAFORGE_*` environment twin (12-factor configuration).

use clap::Args;
use std::path::PathBuf;

/// Where state lives: the data directory, the database and the blob store.
#[derive(Debug, Clone, Args)]
pub struct StorageArgs {
    /// Directory for the SQLite database, uploaded files and temp files.
    #[arg(long, env = "LORAFORGE_DATA_DIR", default_value = "./data")]
    pub data_dir: PathBuf,
    /// Database URL: `postgres://user@host/db` or `sqlite:///path/to.db`
    /// [default: SQLite at <data-dir>/loraforge.db]
    #[arg(long, env = "LORAFORGE_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Blob storage URL: `s3://bucket/prefix` (credentials from `AWS_*` variables) or
    /// `file:///abs/dir` [default: <data-dir>/blobs]
    #[arg(long, env = "LORAFORGE_STORAGE_URL")]
    pub storage_url: Option<String>,
}

/// Logging.
#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log as JSON lines instead of human-readable text.
    #[arg(long, env = "LORAFORGE_LOG_JSON", global = true)]
    pub log_json: bool,
    /// Log filter, in `RUST_LOG` syntax (e.g. `info,loraforge=debug`).
    #[arg(long, env = "LORAFORGE_LOG", default_value = "info", global = true)]
    pub log: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "LORAFORGE_HOST", default_value = "127.0.0.1")]
    pub host: String,
    /// Port to listen on (0 picks a free one; the bound address is printed).
    #[arg(long, env = "LORAFORGE_PORT", default_value_t = 8080)]
    pub port: u16,
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Directory of base models (HuggingFace folders and .gguf files).
    #[arg(long, env = "LORAFORGE_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,
    /// Largest accepted upload, in bytes (the whole request body).
    #[arg(long, env = "LORAFORGE_MAX_UPLOAD_BYTES", default_value_t = 1 << 30)]
    pub max_upload_bytes: u64,
    /// Fewest examples a training file must hold to be `processed`.
    #[arg(long, env = "LORAFORGE_MIN_EXAMPLES", default_value_t = 1)]
    pub min_examples: u64,
    /// Largest JSON request body (job creation, chat), in bytes.
    #[arg(long, env = "LORAFORGE_MAX_JSON_BYTES", default_value_t = 4 << 20)]
    pub max_json_bytes: usize,
    /// Largest diffusers pipeline (parameters) whose text-to-image jobs a CPU worker may
    /// take; bigger ones wait for a CUDA worker (SD 1.5 at 512 px is minutes per step on
    /// a CPU). Set it high to let CPU workers take every image job.
    #[arg(
        long,
        env = "LORAFORGE_CPU_IMAGE_MAX_PARAMS",
        default_value_t = 100_000_000
    )]
    pub cpu_image_max_params: u64,
    /// Most queued or running jobs one owner (API key) may have; 0 is no limit.
    #[arg(long, env = "LORAFORGE_MAX_ACTIVE_JOBS_PER_OWNER", default_value_t = 0)]
    pub max_active_jobs_per_owner: u64,
    /// Most bytes of files one owner (API key) may store; 0 is no limit.
    #[arg(
        long,
        env = "LORAFORGE_MAX_STORED_BYTES_PER_OWNER",
        default_value_t = 0
    )]
    pub max_stored_bytes_per_owner: u64,
    /// Seconds a request may take to produce its response (uploads and the bodies of
    /// streams excepted); 0 is no limit.
    #[arg(long, env = "LORAFORGE_REQUEST_TIMEOUT_SECONDS", default_value_t = 300)]
    pub request_timeout_seconds: u64,
    /// Seconds a client may take to send a request's headers (slowloris); 0 is no limit.
    #[arg(long, env = "LORAFORGE_HEADER_TIMEOUT_SECONDS", default_value_t = 30)]
    pub header_timeout_seconds: u64,
    /// Seconds an upload may send nothing before it is dropped with its temp file; 0 is
    /// no limit.
    #[arg(long, env = "LORAFORGE_UPLOAD_IDLE_SECONDS", default_value_t = 60)]
    pub upload_idle_seconds: u64,
    /// Origins allowed by CORS, comma-separated (`*` for any); none by default.
    #[arg(long, env = "LORAFORGE_CORS_ORIGINS", value_delimiter = ',')]
    pub cors_origins: Vec<String>,
    /// Host names (comma-separated) the API answers to, besides localhost, when it runs
    /// without keys on a loopback address (e.g. the name a local proxy uses).
    #[arg(long, env = "LORAFORGE_ALLOWED_HOSTS", value_delimiter = ',')]
    pub allowed_hosts: Vec<String>,
    /// A static admin key: with it set, every /v1 request must carry
    /// `Authorization: Bearer <key>` with this key or one made by `loraforge keys create`.
    #[arg(long, env = "LORAFORGE_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Serve without authentication on a non-loopback address when no API key exists
    /// (refused otherwise: create a key with `loraforge keys create`).
    #[arg(long, env = "LORAFORGE_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    #[command(flatten)]
    pub workers: WorkerArgs,
}

/// The in-process worker pool.
#[derive(Debug, Clone, Args)]
pub struct WorkerArgs {
    /// Devices to train on, one worker each (`cpu`, `cuda:0,cuda:1`); `none` runs no
    /// worker in this process (jobs wait for a `loraforge worker`).
    #[arg(
        long,
        env = "LORAFORGE_DEVICES",
        default_value = "cpu",
        value_delimiter = ','
    )]
    pub devices: Vec<String>,
    /// Compute threads for CPU training [default: cores - 1, at least 1, so the HTTP
    /// side keeps a core while a job trains].
    #[arg(long, env = "LORAFORGE_TRAIN_THREADS")]
    pub train_threads: Option<usize>,
    /// Seconds a worker's claim on a job lasts without a heartbeat.
    #[arg(long, env = "LORAFORGE_LEASE_SECONDS", default_value_t = 30)]
    pub lease_seconds: u64,
    /// Memory (MiB) each worker reports for its device when that is less than the device
    /// has (a GPU shared with other work); job admission compares against what workers
    /// report [default: the device's own].
    #[arg(long, env = "LORAFORGE_DEVICE_MEMORY_MIB")]
    pub device_memory_mib: Option<u64>,
}

/// `loraforge keys`: API keys in the database.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum KeysCommand {
    /// Make a key and print it on stdout, once: only its hash is stored.
    Create(KeysCreateArgs),
    /// List keys (never the keys themselves): id, name, prefix, admin, dates.
    List(KeysListArgs),
    /// Revoke a key, by id or by its displayed prefix; it is refused from then on.
    Revoke(KeysRevokeArgs),
}

#[derive(Debug, Clone, Args)]
pub struct KeysCreateArgs {
    /// Who or what the key is for (shown by `keys list`).
    #[arg(long)]
    pub name: String,
    /// An admin key sees and acts on every owner's files and jobs.
    #[arg(long)]
    pub admin: bool,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct KeysRevokeArgs {
    /// The key's id (`key-…`) or its prefix as `keys list` shows it (`lf-…`).
    pub key: String,
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ModelsArgs {
    /// Directory of base models (HuggingFace folders and .gguf files).
    #[arg(long, env = "LORAFORGE_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `loraforge worker`: the worker pool without the HTTP API, for other machines.
#[derive(Debug, Clone, Args)]
pub struct WorkerCmdArgs {
    #[command(flatten)]
    pub storage: StorageArgs,
    /// Directory of base models (HuggingFace folders and .gguf files).
    #[arg(long, env = "LORAFORGE_MODELS_DIR", default_value = "./models")]
    pub models_dir: PathBuf,
    #[command(flatten)]
    pub workers: WorkerArgs,
}
