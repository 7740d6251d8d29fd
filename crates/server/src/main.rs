//! The `loraforge` binary: `serve`, `worker`, `train`, `merge`, `generate`, `keys`...
//!
//! `api/` is the HTTP layer (handlers per resource, errors mapped to HTTP in one place);
//! `job/` the job domain with no HTTP in it (specs, artifacts, the adapter zip), used by
//! the handlers, the worker pool (`worker`) and inference alike; `train_cmd` the engine
//! from the command line; `app` wires state, router and shutdown.
mod api;
mod app;
mod auth;
mod config;
mod dashboard;
mod feeds;
mod guard;
mod inference;
mod job;
mod train_cmd;
mod upload;
mod worker;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "loraforge", version, about = "LoRA fine-tuning job server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    log: config::LogArgs,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the HTTP API server.
    Serve(config::ServeArgs),
    /// Run training workers only (no HTTP API), sharing the server's database and blob store.
    Worker(config::WorkerCmdArgs),
    /// Apply database migrations and exit.
    Migrate(config::MigrateArgs),
    /// Create, list and revoke API keys.
    #[command(subcommand)]
    Keys(config::KeysCommand),
    /// List the base models found in the models directory.
    Models(config::ModelsArgs),
    /// Train a LoRA adapter from the command line.
    Train(train_cmd::TrainArgs),
    /// Merge an adapter into its base model.
    Merge(train_cmd::MergeArgs),
    /// Write an adapter in another format (the LoRA GGUF llama.cpp loads).
    Export(train_cmd::ExportArgs),
    /// Generate text with a base model, optionally with an adapter.
    Generate(train_cmd::GenerateArgs),
    /// Classify texts with a sequence-classification adapter (prints label probabilities).
    Classify(train_cmd::ClassifyArgs),
    /// Transcribe speech with a Whisper model, optionally with an adapter.
    Transcribe(train_cmd::TranscribeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(a) => {
            app::init_tracing(&cli.log)?;
            set_train_threads(a.workers.train_threads);
            open_blas()?;
            runtime()?.block_on(app::serve(a))
        }
        Command::Worker(a) => {
            app::init_tracing(&cli.log)?;
            set_train_threads(a.workers.train_threads);
            open_blas()?;
            runtime()?.block_on(app::worker(a))
        }
        Command::Migrate(a) => {
            app::init_tracing(&cli.log)?;
            runtime()?.block_on(app::migrate(a))
        }
        Command::Keys(k) => {
            app::init_tracing(&cli.log)?;
            runtime()?.block_on(app::keys(k))
        }
        Command::Models(a) => app::list_models(a),
        Command::Train(a) => train_cmd::train(a),
        Command::Merge(a) => train_cmd::merge(a),
        Command::Export(a) => train_cmd::export(a),
        Command::Generate(a) => train_cmd::generate(a),
        Command::Classify(a) => train_cmd::classify(a),
        Command::Transcribe(a) => train_cmd::transcribe(a),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// Sizes candle's CPU pools before any tensor work: by default one core fewer than the
/// machine has, so the HTTP side stays responsive while a job trains.
/// `RAYON_NUM_THREADS`, when set and no flag says otherwise, is kept.
fn set_train_threads(threads: Option<usize>) {
    let from_env = std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let n = threads
        .or(from_env)
        .unwrap_or(cores.saturating_sub(1))
        .max(1);
    loraforge_trainer::device::set_cpu_threads(n);
}

/// Opens the BLAS the CPU workers will multiply with, and logs which it is: a library
/// named by `LORAFORGE_BLAS` that cannot be used stops the process here, with its reason.
fn open_blas() -> anyhow::Result<()> {
    loraforge_trainer::ops::matmul::check()?;
    tracing::info!(
        matmul = %loraforge_trainer::ops::matmul::describe(),
        "CPU matrix products"
    );
    Ok(())
}
