//! BERT-style encoders (bert, roberta) for sequence classification: model and head,
//! pair tokenizer, label sets, and classifying with a trained adapter.

pub mod classify;
pub mod labels;
pub mod model;
pub mod objective;
pub mod tokenize;

use super::family::{check_targets, Family, Field, JobCheck, Refusal};
use crate::data::DataFormat;
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::{Error, Result};
use model::ProblemType;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// PEFT's default LoRA targets for BERT-style encoders.
pub const TARGETS: [&str; 2] = ["query", "value"];

/// The encoder family's options.
#[derive(Debug, Clone, Default)]
pub struct EncoderOptions {
    /// transformers' problem type; `None` infers it from the labels.
    pub problem_type: Option<ProblemType>,
}

/// Sequence classification on BERT-style encoders.
pub struct EncoderFamily;

impl Family for EncoderFamily {
    fn name(&self) -> &'static str {
        "encoder"
    }
    fn task(&self) -> Task {
        Task::SequenceClassification
    }
    fn architectures(&self) -> &'static [&'static str] {
        &model::ENCODER_ARCHITECTURES
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[DataFormat::Classification]
    }
    fn checks_data(&self) -> bool {
        true
    }
    fn adapter_files(&self) -> &'static [&'static str] {
        &[labels::LABELS_FILE]
    }
    /// The label set must hold up: at least two classes in training, no validation
    /// label that training lacks.
    fn check_job(&self, job: &JobCheck) -> std::result::Result<(), Refusal> {
        check_targets(job, &module_paths(job.model))?;
        let Some(train) = job.training else {
            return Ok(());
        };
        let problem = match job.spec.get("problem_type").and_then(|p| p.as_str()) {
            Some(p) => Some(ProblemType::parse(p).map_err(|e| Refusal {
                field: Field::Setting("problem_type"),
                message: e.to_string(),
            })?),
            None => None,
        };
        labels::check_files(
            (train.name, train.text),
            job.validation.map(|v| (v.name, v.text)),
            problem,
        )
        .map(|_| ())
        .map_err(|e| {
            let m = e.to_string();
            let m = m.strip_prefix("data: ").unwrap_or(&m).to_string();
            let field = match job.validation {
                Some(v) if m.starts_with(v.name) => Field::ValidationFile,
                _ => Field::TrainingFile,
            };
            Refusal { field, message: m }
        })
    }
    fn default_targets(&self) -> Targets {
        Targets::Names(TARGETS.iter().map(|s| s.to_string()).collect())
    }
    fn options(&self, v: &serde_json::Value) -> Result<FamilyOptions> {
        let problem_type = match v.get("problem_type") {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(s)) => Some(ProblemType::parse(s)?),
            Some(_) => return Err(Error::Config("problem_type must be a string".into())),
        };
        Ok(FamilyOptions::new(EncoderOptions { problem_type }))
    }
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome> {
        // The head and the label set come with the adapter a run resumes or starts from.
        let from = resume.or(spec.init_adapter.as_deref());
        let obj = objective::SeqCls::load(spec, from)?;
        train::run(obj, spec, resume.map(Path::to_path_buf), cancel, on_event)
    }
}

/// The paths of an encoder folder's linear modules (the ones LoRA can go on), from its
/// `config.json`; none when it cannot be read (then nothing is checked here).
fn module_paths(model: &Path) -> Vec<String> {
    let Ok(v) = crate::io::read_json::<serde_json::Value>(&model.join("config.json")) else {
        return Vec::new();
    };
    let Ok(cfg) = model::EncoderConfig::from_hf_json(&v) else {
        return Vec::new();
    };
    let p = cfg.kind.prefix();
    let mut out = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        for m in [
            "attention.self.query",
            "attention.self.key",
            "attention.self.value",
            "attention.output.dense",
            "intermediate.dense",
            "output.dense",
        ] {
            out.push(format!("{p}.encoder.layer.{i}.{m}"));
        }
    }
    if cfg.kind == model::EncoderKind::Bert {
        out.push(format!("{p}.pooler.dense"));
    }
    out
}
