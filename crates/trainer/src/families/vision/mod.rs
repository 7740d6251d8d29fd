//! Image classification on CNNs (transformers' `ResNetForImageClassification`): the
//! model with PEFT's module names, the model folder's image processor, ImageFolder zips,
//! and classifying images with a trained adapter.
//!
//! LoRA goes on the convolutions (PEFT's conv LoRA, [`crate::lora::Conv2d`]) by module
//! name; the classifier is trained in full (`modules_to_save: ["classifier"]`), with a new
//! head when the data's labels are not the checkpoint's; BatchNorm stays in eval mode.

pub mod classify;
pub mod dataset;
pub mod objective;
pub mod preprocess;
pub mod resnet;

use super::family::{check_targets, Family, Field, JobCheck, Refusal};
use crate::data::DataFormat;
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::Result;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// PEFT's usual LoRA targets on a ResNet: every `ResNetConvLayer`'s and shortcut's
/// `convolution`.
pub const TARGETS: [&str; 1] = ["convolution"];

/// Image classification on ResNets.
pub struct VisionFamily;

impl Family for VisionFamily {
    fn name(&self) -> &'static str {
        "vision"
    }
    fn task(&self) -> Task {
        Task::ImageClassification
    }
    fn architectures(&self) -> &'static [&'static str] {
        &resnet::ARCHITECTURES
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[DataFormat::ImageClasses]
    }
    fn adapter_files(&self) -> &'static [&'static str] {
        &[crate::classes::LABELS_FILE]
    }
    /// The targets must name convolutions of the model, and the model must say how to
    /// turn an image into its input.
    fn check_job(&self, job: &JobCheck) -> std::result::Result<(), Refusal> {
        let cfg = resnet::ResNetConfig::load(job.model).map_err(|e| Refusal {
            field: Field::Model,
            message: format!("Model {}: {e}", job.model_id),
        })?;
        preprocess::Preprocessor::load(job.model, cfg.num_channels).map_err(|e| Refusal {
            field: Field::Model,
            message: format!("Model {}: {e}", job.model_id),
        })?;
        if job.spec.get("lora_target_modules").and_then(|t| t.as_str()) == Some("all-linear") {
            return Err(Refusal {
                field: Field::Hyperparameter("lora_target_modules"),
                message: format!(
                    "hyperparameters.lora_target_modules: all-linear takes no module of {} (its \
                     one linear layer, the classifier, is trained in full); name convolutions, \
                     e.g. [\"convolution\"]",
                    job.model_id
                ),
            });
        }
        check_targets(job, &cfg.conv_paths())
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
        // The head and the label set come with the adapter a run resumes or starts from.
        let from = resume.or(spec.init_adapter.as_deref());
        let obj = objective::ImageCls::load(spec, from)?;
        train::run(obj, spec, resume.map(Path::to_path_buf), cancel, on_event)
    }
}
