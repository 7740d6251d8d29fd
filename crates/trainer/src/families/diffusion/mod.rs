//! Stable Diffusion: a training-capable port of diffusers' `UNet2DConditionModel`
//! (SD 1.x / 2.x), read from a diffusers folder.
//!
//! candle-transformers' UNet is an inference model: its LayerNorm and softmax are fused
//! ops without a backward pass (so LoRA on `to_q`/`to_k`, and on every block before a
//! LayerNorm, would silently get no or partial gradients), its GeGLU uses tanh-GELU
//! where diffusers uses erf, its down/up blocks ignore `norm_num_groups`, it takes one
//! timestep per batch, and its layers are private types that cannot carry adapters.
//! So the UNet here is our own, with diffusers' module names (which are also the
//! weight names and the names PEFT and kohya adapters use), built from differentiable
//! pieces and the frozen/LoRA linear ops the decoders use.
//!
//! Around it: `clip` (tokenizer and frozen text encoder) and `vae` (the frozen encoder's
//! moments) prepare the conditioning and latents once per run; `diffusion` is the DDPM
//! noising and targets; `objective` is the training step; `dataset` reads captioned
//! image zips (kohya folders, flat pairs, diffusers imagefolder); `kohya` reads and writes the kohya-format LoRA files the SD UIs load, and converts
//! them to and from PEFT adapter folders.

pub mod clip;
pub mod dataset;
pub mod ddpm;
pub mod kohya;
mod layers;
pub mod objective;
pub mod unet;
pub mod vae;

use super::family::{Family, Field, JobCheck, Refusal};
use crate::data::DataFormat;
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::Result;
use objective::ImageSettings;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// kohya's LoCon modules beyond the attention blocks: every ResnetBlock2D's convolutions
/// and timestep projection, and the down- and upsamplers' convolution. A run with a conv
/// rank (kohya's `conv_dim`) adapts them; the 3×3 ones take that rank, the rest the run's.
pub const LOCON_TARGETS: [&str; 6] = [
    "conv1",
    "conv2",
    "conv_shortcut",
    "time_emb_proj",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
];

/// `targets` (comma-separated names) with [`LOCON_TARGETS`] added where missing; `None`
/// for `all-linear`, which names no convolution.
pub fn with_locon_targets(targets: &str) -> Option<String> {
    if matches!(targets.trim(), "all-linear" | "all_linear") {
        return None;
    }
    let mut names: Vec<&str> = targets
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .collect();
    for t in LOCON_TARGETS {
        if !names.contains(&t) {
            names.push(t);
        }
    }
    Some(names.join(","))
}

/// LoRA on a Stable Diffusion UNet from captioned images.
pub struct DiffusionFamily;

impl Family for DiffusionFamily {
    fn name(&self) -> &'static str {
        "diffusion"
    }
    fn task(&self) -> Task {
        Task::TextToImage
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[DataFormat::ImageZip]
    }
    fn adapter_files(&self) -> &'static [&'static str] {
        &[objective::KOHYA_FILE]
    }
    fn check_job(&self, job: &JobCheck) -> std::result::Result<(), Refusal> {
        if job.has_validation {
            return Err(Refusal {
                field: Field::ValidationFile,
                message:
                    "validation_file: text_to_image jobs have no validation loss yet; leave it out."
                        .into(),
            });
        }
        if let Some(r) = job.spec.get("resolution").and_then(|r| r.as_u64()) {
            let (multiple, _) = objective::resolution_rule(job.model).map_err(|e| Refusal {
                field: Field::Model,
                message: format!("Model {}: {e}", job.model_id),
            })?;
            if !(r as usize).is_multiple_of(multiple) {
                return Err(Refusal {
                    field: Field::Hyperparameter("resolution"),
                    message: format!(
                        "hyperparameters.resolution must be a multiple of {multiple} for model {}",
                        job.model_id
                    ),
                });
            }
        }
        Ok(())
    }
    fn pipelines(&self) -> &'static [&'static str] {
        // SD 1.x / 2.x: the UNet, VAE and CLIP text encoder this family ports.
        &["StableDiffusionPipeline"]
    }
    fn default_targets(&self) -> Targets {
        // diffusers' train_text_to_image_lora.py.
        Targets::Names(
            ["to_q", "to_k", "to_v", "to_out.0"]
                .iter()
                .map(|s| s.to_string())
                .collect(),
        )
    }
    fn options(&self, v: &serde_json::Value) -> Result<FamilyOptions> {
        let settings: ImageSettings = serde_json::from_value(v.clone())?;
        Ok(FamilyOptions::new(settings))
    }
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome> {
        let obj = objective::TextToImage::load(spec)?;
        train::run(obj, spec, resume.map(Path::to_path_buf), cancel, on_event)
    }
}
