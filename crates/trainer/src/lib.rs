//! loraforge's training engine: LoRA fine-tuning on candle, with adapters that are
//! exactly the ones HuggingFace PEFT would train and write.
//!
//! This crate knows tensors, tokenizers and files; it knows nothing of HTTP or SQL.
//! The model code is our own (candle-transformers' models use fused ops without a
//! backward pass and give LoRA no hook). The house: `io` reads weights, `ops` are the
//! custom ops with their backward, `nn` the shared layers, `archive` the uploaded zips, `lora` the adapter layer and
//! PEFT files, `train` the one loop (it knows no family), and `families/` one folder per
//! model family behind `trait Family`, found through the registry [`families::ALL`].
//! [`train()`] runs a job with the family that trains its task.

pub mod archive;
pub mod classes;
pub mod data;
pub mod device;
pub mod families;
pub mod io;
pub mod lora;
pub mod nn;
pub mod ops;
pub mod train;

pub use families::{Family, ALL as FAMILIES};
pub use train::{TrainEvent, TrainOutcome, TrainSpec};

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// Runs a whole training job with the family that trains `spec.task`: checks the spec,
/// finds the checkpoint to resume from, and hands over to the family's objective.
pub fn train(
    spec: &TrainSpec,
    cancel: &AtomicBool,
    on_event: &mut dyn FnMut(&TrainEvent),
) -> Result<TrainOutcome> {
    spec.validate()?;
    if spec.device.is_cpu() {
        device::tune_allocator_for_training();
    }
    let resume = spec
        .resume
        .as_deref()
        .map(train::resolve_checkpoint)
        .transpose()?;
    let family = families::for_task(spec.task);
    family.compute_dtype(spec)?;
    family.train(spec, resume.as_deref(), cancel, on_event)
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

    /// The message without the kind's prefix (`data: `, `config: `...), for a caller
    /// that names the field itself.
    pub fn detail(&self) -> String {
        match self {
            Error::Model(m)
            | Error::Unsupported(m)
            | Error::Data(m)
            | Error::Tokenizer(m)
            | Error::Template(m)
            | Error::Adapter(m)
            | Error::Config(m)
            | Error::Checkpoint(m) => m.clone(),
            e => e.to_string(),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
