//! loraforge's training engine: LoRA fine-tuning on candle, with adapters that are
//! exactly the ones HuggingFace PEFT would train and write.
//!
//! This crate knows tensors, tokenizers and files; it knows nothing of HTTP or SQL.
//! The model code is our own (candle-transformers' models use fused ops without a
//! backward pass and give LoRA no hook), and the LoRA layer and the training loop
//! are independent of the architecture so that encoders and UNets can join later.

pub mod adapters;
pub mod classify;
pub mod config;
pub mod data;
pub mod device;
pub mod encoder;
pub mod export;
pub mod generate;
pub mod labels;
pub mod loader;
pub mod lora;
pub mod model;
pub mod ops;
pub mod optim;
pub mod registry;
pub mod sd;
pub mod tokenize;
pub mod train;

use std::path::{Path, PathBuf};

/// A JSON file (a model's `config.json`, an adapter's config, ...), naming the file when
/// it cannot be read.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    Ok(serde_json::from_str(&text)?)
}

/// Everything that can go wrong in the engine.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("model: {0}")]
    Model(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("data: {0}")]
    Data(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("adapter: {0}")]
    Adapter(String),
    #[error("config: {0}")]
    Config(String),
    #[error("checkpoint: {0}")]
    Checkpoint(String),
    #[error("cancelled")]
    Cancelled,
    /// Stopped on request after `0` steps, with a checkpoint at that step.
    #[error("paused after step {0}")]
    Paused(u64),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

impl Error {
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
