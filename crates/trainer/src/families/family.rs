//! What a model family is to the rest of the engine.

use crate::data::DataFormat;
use crate::device::dtype_name;
use crate::lora::Targets;
use crate::train::{FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::{Error, Result};
use candle_core::DType;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// A family of models the engine trains (llama-style decoders, BERT-style encoders,
/// Stable Diffusion). The loop, the server and the CLI reach a family through
/// [`super::ALL`]; a new family is a folder and a line there.
pub trait Family: Sync {
    /// Short name, for messages.
    fn name(&self) -> &'static str;
    /// What its objective trains the model for.
    fn task(&self) -> Task;
    /// The architectures it trains, as a model names itself: `model_type` in an HF
    /// `config.json`, `general.architecture` in a GGUF file.
    fn architectures(&self) -> &'static [&'static str] {
        &[]
    }
    /// The diffusers pipelines (`_class_name` in `model_index.json`) it trains.
    fn pipelines(&self) -> &'static [&'static str] {
        &[]
    }
    /// The data formats its objective trains on.
    fn data_formats(&self) -> &'static [DataFormat];
    /// Files its adapter folders carry besides PEFT's two (a label set, a kohya copy):
    /// downloads and checkpoints keep them with the adapter.
    fn adapter_files(&self) -> &'static [&'static str] {
        &[]
    }
    /// Whether [`Family::check_job`] reads the data itself (so the caller should pass
    /// the files' text when it can).
    fn checks_data(&self) -> bool {
        false
    }
    /// Checks a job against its model and data before it is queued, so that a job that
    /// cannot train is refused at once, naming the field at fault, instead of failing
    /// in a worker later.
    fn check_job(&self, _job: &JobCheck) -> std::result::Result<(), Refusal> {
        Ok(())
    }
    /// The modules a LoRA goes on when a job names none (the family's usual PEFT set).
    fn default_targets(&self) -> Targets;
    /// [`Self::default_targets`] for one model, where its layout changes them (a decoder
    /// that fuses its projections).
    fn default_targets_for(&self, _model: &Path) -> Targets {
        self.default_targets()
    }
    /// Whether the family can keep its frozen base packed (`base_dtype` other than
    /// `auto` or `f32`).
    fn packs_base(&self) -> bool {
        false
    }
    /// The compute precisions its models run in (activations and frozen weights; LoRA
    /// weights and optimizer state are f32 whatever this is).
    fn dtypes(&self) -> &'static [DType] {
        &[DType::F32]
    }
    /// The precision a run gets when it names none, on a GPU or not.
    fn default_dtype(&self, _on_gpu: bool) -> DType {
        DType::F32
    }
    /// The precision `spec` runs in: its own, or the family's default for its device;
    /// one the family cannot run is an error naming the ones it can.
    fn compute_dtype(&self, spec: &TrainSpec) -> Result<DType> {
        self.check_dtype(
            spec.dtype
                .unwrap_or_else(|| self.default_dtype(spec.device.is_cuda())),
        )
    }
    /// About how much memory training `model` with `job` (a job's settings as JSON:
    /// `batch_size`, `max_seq_len`) takes in `dtype`: the frozen weights plus the
    /// activations a step keeps. `None` when the family cannot tell (the job is then
    /// admitted unchecked).
    fn estimate_memory(
        &self,
        _model: &Path,
        _job: &serde_json::Value,
        _dtype: DType,
    ) -> Option<MemoryEstimate> {
        None
    }
    /// `d`, when the family runs in it; else an error naming the ones it does.
    fn check_dtype(&self, d: DType) -> Result<DType> {
        if self.dtypes().contains(&d) {
            return Ok(d);
        }
        Err(Error::Config(format!(
            "dtype {}: {} models train in {} here",
            dtype_name(d),
            self.name(),
            self.dtypes()
                .iter()
                .map(|d| dtype_name(*d))
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }
    /// The family's own settings from a JSON object (a job's spec, the CLI's flags as
    /// JSON); keys that belong to other families are ignored.
    fn options(&self, v: &serde_json::Value) -> Result<FamilyOptions>;
    /// Builds the objective from `spec` and runs the training loop on it, from the
    /// checkpoint `resume` when given.
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome>;
}

/// A job about to be queued, as a family checks it.
pub struct JobCheck<'a> {
    /// The base model's name, for messages.
    pub model_id: &'a str,
    /// The base model's folder or file.
    pub model: &'a Path,
    /// The job's settings as JSON (the keys of a job's stored spec).
    pub spec: &'a serde_json::Value,
    /// The training data as text, when the caller read it (see [`Family::checks_data`]).
    pub training: Option<Named<'a>>,
    /// The validation data as text, when the caller read it.
    pub validation: Option<Named<'a>>,
    /// Whether the job has validation data at all (read or not).
    pub has_validation: bool,
}

/// A data file's text and how messages name it (`training_file file-...`).
#[derive(Clone, Copy)]
pub struct Named<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// The field of a job that a refusal is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Model,
    TrainingFile,
    ValidationFile,
    /// A key of the job's hyperparameters.
    Hyperparameter(&'static str),
    /// Another setting of the job, by its name (`problem_type`).
    Setting(&'static str),
}

/// Why a job cannot be queued.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    pub field: Field,
    pub message: String,
}

/// Checks a job's `lora_target_modules` (as stored: `all-linear` or comma-separated
/// names) against the module paths of its model, by PEFT's rule (a name matches a path
/// that is it or ends in `.name`): every name must match one, so that a typo is refused
/// at creation, naming what the model has, rather than in a worker.
pub(crate) fn check_targets(job: &JobCheck, paths: &[String]) -> std::result::Result<(), Refusal> {
    // No list of modules (a GGUF base, an unreadable config): the worker checks.
    if paths.is_empty() {
        return Ok(());
    }
    let Some(targets) = job.spec.get("lora_target_modules").and_then(|t| t.as_str()) else {
        return Ok(());
    };
    let Ok(Targets::Names(names)) = Targets::parse(targets) else {
        return Ok(());
    };
    for name in &names {
        let one = Targets::Names(vec![name.clone()]);
        if !paths.iter().any(|p| one.matches(p, false)) {
            let mut leaves: Vec<&str> = paths
                .iter()
                .map(|p| p.rsplit('.').next().unwrap_or(p))
                .collect();
            leaves.sort();
            leaves.dedup();
            let shown: String = name.chars().take(64).collect();
            return Err(Refusal {
                field: Field::Hyperparameter("lora_target_modules"),
                message: format!(
                    "hyperparameters.lora_target_modules: {shown:?} is no module of {}; its linear modules are {}",
                    job.model_id,
                    leaves.join(", ")
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_names_are_checked_by_peft_rule_when_the_modules_are_known() {
        let spec = serde_json::json!({"lora_target_modules": "q_proj,self_attn.v_proj"});
        let job = |spec| JobCheck {
            model_id: "m",
            model: Path::new("m"),
            spec,
            training: None,
            validation: None,
            has_validation: false,
        };
        let paths: Vec<String> = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert!(check_targets(&job(&spec), &paths).is_ok());
        let typo = serde_json::json!({"lora_target_modules": "q_proj,qproj"});
        let e = check_targets(&job(&typo), &paths).unwrap_err();
        assert_eq!(e.field, Field::Hyperparameter("lora_target_modules"));
        assert!(
            e.message.contains("\"qproj\"") && e.message.contains("q_proj, v_proj"),
            "{e}"
        );
        // Unknown modules (a GGUF base): nothing to check against here.
        assert!(check_targets(&job(&typo), &[]).is_ok());
        let all = serde_json::json!({"lora_target_modules": "all-linear"});
        assert!(check_targets(&job(&all), &paths).is_ok());
    }
}

/// What a training run needs in memory, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryEstimate {
    /// The frozen base weights.
    pub weights: u64,
    /// What a step keeps for its backward pass, plus its largest transient.
    pub activations: u64,
}

impl MemoryEstimate {
    pub fn total(&self) -> u64 {
        self.weights + self.activations
    }
}
