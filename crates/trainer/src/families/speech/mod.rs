//! Speech recognition on Whisper (transformers' `WhisperForConditionalGeneration`):
//! clips decoded and resampled to 16 kHz mono ([`audio`]), the log-mel features its
//! encoder reads, exactly as `WhisperFeatureExtractor` computes them ([`features`]), the
//! model with PEFT's module names ([`whisper`]), zips of clips and transcripts
//! ([`dataset`]), the decoder prompt and the fine-tuning recipe's labels ([`tokenize`]),
//! the objective with WER on validation ([`objective`]), and greedy transcription
//! ([`transcribe`]).
//!
//! LoRA goes on the attention and MLP projections by PEFT name (`q_proj,v_proj` by
//! default, as the Whisper LoRA recipes have it); the front end, embeddings and norms
//! stay frozen.

pub mod audio;
pub mod dataset;
pub mod features;
pub mod objective;
pub mod tokenize;
pub mod transcribe;
pub mod whisper;

use super::family::{check_targets, Family, Field, JobCheck, Refusal};
use crate::data::DataFormat;
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::{Error, Result};
use features::{LogMel, HOP, N_FFT, N_FRAMES, N_SAMPLES};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use whisper::WhisperConfig;

/// The Whisper LoRA recipes' targets.
pub const TARGETS: [&str; 2] = ["q_proj", "v_proj"];

/// The language of clips whose data names none.
pub const DEFAULT_LANGUAGE: &str = "en";

/// A speech run's own settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpeechOptions {
    /// The language code (`en`) of clips whose metadata names none.
    pub language: String,
}

/// The feature extractor a Whisper folder's `preprocessor_config.json` describes, when
/// it is the one implemented here (16 kHz, 400-point FFT, hop 160, 30 s, as many mel
/// bins as the model reads); a folder without the file gets that one. Anything else is
/// an error naming the setting.
pub fn check_preprocessor(dir: &Path, cfg: &WhisperConfig) -> Result<LogMel> {
    if cfg.input_frames() != N_FRAMES {
        return Err(Error::Unsupported(format!(
            "the model reads {} mel frames; Whisper's feature extractor makes {N_FRAMES} (30 s)",
            cfg.input_frames()
        )));
    }
    let p = dir.join("preprocessor_config.json");
    if p.is_file() {
        let v: serde_json::Value = crate::io::read_json(&p)?;
        let want = [
            ("feature_size", cfg.num_mel_bins),
            ("sampling_rate", audio::SAMPLE_RATE as usize),
            ("n_fft", N_FFT),
            ("hop_length", HOP),
            ("n_samples", N_SAMPLES),
            ("nb_max_frames", N_FRAMES),
        ];
        for (key, value) in want {
            if let Some(got) = v.get(key).and_then(|x| x.as_u64()) {
                if got != value as u64 {
                    return Err(Error::Unsupported(format!(
                        "{}: {key} {got}; Whisper's feature extractor here has {value}",
                        p.display()
                    )));
                }
            }
        }
        // Dither adds random noise to every clip: features that no run could reproduce.
        if v.get("dither").and_then(|d| d.as_f64()).unwrap_or(0.0) != 0.0 {
            return Err(Error::Unsupported(format!(
                "{}: dither is not 0 (the features here are exact)",
                p.display()
            )));
        }
    }
    Ok(LogMel::new(cfg.num_mel_bins))
}

/// Speech recognition on Whisper.
pub struct SpeechFamily;

impl Family for SpeechFamily {
    fn name(&self) -> &'static str {
        "speech"
    }
    fn task(&self) -> Task {
        Task::SpeechRecognition
    }
    fn architectures(&self) -> &'static [&'static str] {
        &whisper::ARCHITECTURES
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[DataFormat::AudioTranscripts]
    }
    /// The model must be a Whisper this port reads, with a tokenizer and the feature
    /// extractor implemented here; the language must be one of its own; the targets must
    /// name its projections.
    fn check_job(&self, job: &JobCheck) -> std::result::Result<(), Refusal> {
        let model = |e: Error| Refusal {
            field: Field::Model,
            message: format!("Model {}: {e}", job.model_id),
        };
        let cfg = crate::io::read_json(&job.model.join("config.json"))
            .and_then(|v| WhisperConfig::from_hf_json(&v))
            .map_err(model)?;
        check_preprocessor(job.model, &cfg).map_err(model)?;
        let text = tokenize::WhisperText::load(job.model).map_err(model)?;
        if let Some(l) = job.spec.get("language").and_then(|l| l.as_str()) {
            text.language(l).map_err(|e| Refusal {
                field: Field::Setting("language"),
                message: e.detail(),
            })?;
        }
        check_targets(job, &cfg.linear_paths())
    }
    fn default_targets(&self) -> Targets {
        Targets::Names(TARGETS.iter().map(|s| s.to_string()).collect())
    }
    fn options(&self, v: &serde_json::Value) -> Result<FamilyOptions> {
        let language = match v.get("language") {
            None | Some(serde_json::Value::Null) => DEFAULT_LANGUAGE.to_string(),
            Some(serde_json::Value::String(s)) if !s.trim().is_empty() => s.trim().to_string(),
            Some(_) => {
                return Err(Error::Config(
                    "language must be a language code such as \"en\"".into(),
                ))
            }
        };
        Ok(FamilyOptions::new(SpeechOptions { language }))
    }
    fn train(
        &self,
        spec: &TrainSpec,
        resume: Option<&Path>,
        cancel: &AtomicBool,
        on_event: &mut dyn FnMut(&TrainEvent),
    ) -> Result<TrainOutcome> {
        let obj = objective::Asr::load(spec)?;
        train::run(obj, spec, resume.map(Path::to_path_buf), cancel, on_event)
    }
}
