//! Llama-family decoders (llama, mistral, qwen2): config, model, loading (HF folders and
//! GGUF), tokenizer and chat template, generation, and merging an adapter into the base.

pub mod config;
pub mod generate;
pub mod loader;
pub mod merge;
pub mod model;
pub mod objective;
pub mod tokenize;

use super::family::Family;
use crate::data::DataFormat;
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::Result;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// The `model_type`s this family builds.
pub const ARCHITECTURES: [&str; 3] = ["llama", "mistral", "qwen2"];

/// The linear modules of llama-family decoders, in PEFT's names: its usual LoRA set.
pub const TARGETS: [&str; 7] = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

/// Causal language modelling on llama-family decoders.
pub struct DecoderFamily;

impl Family for DecoderFamily {
    fn name(&self) -> &'static str {
        "decoder"
    }
    fn task(&self) -> Task {
        Task::CausalLm
    }
    fn architectures(&self) -> &'static [&'static str] {
        &ARCHITECTURES
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[
            DataFormat::Chat,
            DataFormat::PromptCompletion,
            DataFormat::Text,
            DataFormat::Tokenized,
        ]
    }
    fn default_targets(&self) -> Targets {
        Targets::Names(TARGETS.iter().map(|s| s.to_string()).collect())
    }
    fn options(&self, _v: &serde_json::Value) -> Result<FamilyOptions> {
        Ok(FamilyOptions::default())
    }
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome> {
        let obj = objective::CausalLm::load(spec)?;
        train::run(obj, spec, resume.map(Path::to_path_buf), cancel, on_event)
    }
}
