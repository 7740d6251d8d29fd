//! A job's spec: the hyperparameters a client sent, validated and with every default
//! filled, as stored with the job; and its mapping onto the trainer's `TrainSpec`, the
//! one the worker and `loraforge train` both use.

use loraforge_store::JobRecord;
use loraforge_trainer::device::BaseDtype;
use loraforge_trainer::families::for_task;
use loraforge_trainer::lora::{LoraConfig, Targets};
use loraforge_trainer::train::optim::{AdamWConfig, Scheduler};
use loraforge_trainer::train::{Method, Task, TrainSpec, DEFAULT_DPO_BETA};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::PathBuf;

/// A hyperparameter that cannot be accepted: `param` names it as the API does
/// (`hyperparameters.<key>`), `message` says why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct SpecError {
    pub param: String,
    pub message: String,
}

/// Everything a worker needs to run a job, resolved at create time and stored as the
/// job's `spec` (so a job runs as it was accepted, whatever defaults change later).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobSpec {
    /// Absent in specs stored before encoders existed: those are causal LM jobs.
    #[serde(default)]
    pub task: Task,
    /// Supervised, or DPO with its beta; absent in specs stored before DPO existed.
    #[serde(default)]
    pub method: Method,
    /// Sequence classification: transformers' problem type; `None` infers it.
    #[serde(default)]
    pub problem_type: Option<String>,
    /// Speech recognition: the language code of clips whose data names none (`en` when
    /// unset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    pub n_epochs: u64,
    pub batch_size: usize,
    pub learning_rate: f64,
    pub learning_rate_multiplier: f64,
    pub lora_r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f32,
    /// `all-linear` or a comma-separated list.
    pub lora_target_modules: String,
    pub use_rslora: bool,
    pub lr_scheduler: String,
    pub warmup_ratio: f64,
    pub weight_decay: f64,
    pub max_grad_norm: f64,
    pub gradient_accumulation_steps: usize,
    pub max_seq_len: usize,
    pub max_steps: Option<u64>,
    pub train_on_inputs: bool,
    /// Recompute each layer in the backward pass instead of keeping its activations
    /// (causal_lm; ignored by the other tasks).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Supervised causal LM: pack examples into rows of `max_seq_len` tokens that keep them
    /// apart. Absent in specs stored before packing existed: those train unpacked.
    #[serde(default)]
    pub packing: bool,
    pub eval_interval: Option<u64>,
    pub checkpoint_interval: Option<u64>,
    pub seed: u64,
    pub metadata: Option<Value>,
    /// Text-to-image: square training resolution (`None`: the model's native size).
    #[serde(default)]
    pub resolution: Option<u32>,
    /// Text-to-image: min-SNR-γ loss weighting.
    #[serde(default)]
    pub snr_gamma: Option<f64>,
    /// Text-to-image: diffusers' noise offset.
    #[serde(default)]
    pub noise_offset: f64,
    /// Text-to-image: overrides the scheduler's prediction type.
    #[serde(default)]
    pub prediction_type: Option<String>,
    /// Text-to-image LoCon: kohya's `conv_dim` / `conv_alpha`, the rank and alpha of the
    /// UNet's 3×3 convolutions, which `lora_target_modules` then includes.
    #[serde(default)]
    pub conv_rank: Option<usize>,
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// The compute precision (`f32`, `bf16`, `f16`); none: the family's default for the
    /// worker's device (bf16 on CUDA for decoders, f32 otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    /// How the frozen base is kept in memory (`auto`, `f32`, `bf16`, `f16`, `q8_0`,
    /// `q4_0`, `q4_1`, `q5_0`, `q4_k`, `q5_k`, `q6_k`); none: `auto` (a GGUF base in its
    /// own quant types, an HF folder dense).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_dtype: Option<String>,
    /// Checkpoints kept: the newest this many, plus the one with the best validation loss.
    #[serde(default = "default_keep_checkpoints")]
    pub keep_checkpoints: u64,
    /// The sha256 of the creating request's JSON, kept when it came with an
    /// `Idempotency-Key`, so that a retry can be told from a different request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_sha256: Option<String>,
}

/// Checkpoints a job keeps by default (OpenAI keeps its last three).
pub const DEFAULT_KEEP_CHECKPOINTS: u64 = 3;

fn default_keep_checkpoints() -> u64 {
    DEFAULT_KEEP_CHECKPOINTS
}

/// Base learning rate that `learning_rate_multiplier` scales (PEFT's usual LoRA rate).
const BASE_LR: f64 = 2e-4;

fn hp_err(name: &str, what: &str) -> SpecError {
    // The name may be a client's key of any length: quote no more than its start.
    let name = super::cut(name, 64);
    SpecError {
        param: format!("hyperparameters.{name}"),
        message: format!("hyperparameters.{name} {what}"),
    }
}

/// Reads one hyperparameter: absent or `"auto"` gives `default`.
fn hp_num<T: serde::de::DeserializeOwned + PartialOrd + Copy + std::fmt::Display>(
    hp: &serde_json::Map<String, Value>,
    name: &str,
    default: T,
    lo: T,
    hi: T,
) -> Result<T, SpecError> {
    match hp.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::String(s)) if s == "auto" => Ok(default),
        Some(v) => {
            let x: T = serde_json::from_value(v.clone())
                .map_err(|_| hp_err(name, "must be a number or \"auto\""))?;
            if x < lo || x > hi {
                return Err(hp_err(name, &format!("must be between {lo} and {hi}")));
            }
            Ok(x)
        }
    }
}

fn hp_bool(hp: &serde_json::Map<String, Value>, name: &str) -> Result<bool, SpecError> {
    match hp.get(name) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(_) => Err(hp_err(name, "must be a boolean")),
    }
}

/// Hyperparameters of text-to-image jobs only.
const IMAGE_HP: [&str; 6] = [
    "resolution",
    "snr_gamma",
    "noise_offset",
    "prediction_type",
    "conv_rank",
    "conv_alpha",
];

const KNOWN_HP: [&str; 30] = [
    "resolution",
    "conv_rank",
    "conv_alpha",
    "snr_gamma",
    "noise_offset",
    "prediction_type",
    "n_epochs",
    "batch_size",
    "learning_rate_multiplier",
    "learning_rate",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "lora_target_modules",
    "use_rslora",
    "lr_scheduler",
    "warmup_ratio",
    "weight_decay",
    "max_grad_norm",
    "gradient_accumulation_steps",
    "max_seq_len",
    "max_steps",
    "train_on_inputs",
    "gradient_checkpointing",
    "packing",
    "eval_interval",
    "checkpoint_interval",
    "keep_checkpoints",
    "dtype",
    "base_dtype",
];

/// Keys that belong to another method: refused by name rather than accepted and
/// ignored, so a client never believes it trained what it did not.
const OTHER_METHOD_HP: [(&str, &str); 1] = [(
    "beta",
    "applies to method dpo only: send method {\"type\": \"dpo\", \"dpo\": {\"hyperparameters\": {\"beta\": ...}}}",
)];

fn method_err(param: &str, message: String) -> SpecError {
    SpecError {
        param: param.to_string(),
        message,
    }
}

/// OpenAI's `method` object (or its absence, with the legacy top-level
/// `hyperparameters`): the training method, and the hyperparameters the rest of the
/// spec is parsed from (DPO's `beta` taken out). A request is never turned into another
/// one: a method this server does not train, a block that does not match `type`, or
/// hyperparameters given in both places are refused.
pub fn parse_method(
    method: Option<&Value>,
    hyperparameters: Option<&Value>,
) -> Result<(Method, serde_json::Map<String, Value>), SpecError> {
    let as_map = |v: Option<&Value>, param: &str| match v {
        None | Some(Value::Null) => Ok(serde_json::Map::new()),
        Some(Value::Object(m)) => Ok(m.clone()),
        Some(_) => Err(method_err(param, format!("{param} must be an object"))),
    };
    let Some(method) = method.filter(|m| !m.is_null()) else {
        return Ok((
            Method::Supervised,
            as_map(hyperparameters, "hyperparameters")?,
        ));
    };
    let m = method
        .as_object()
        .ok_or_else(|| method_err("method", "method must be an object".into()))?;
    let ty = match m.get("type") {
        Some(Value::String(t)) => t.as_str(),
        _ => {
            return Err(method_err(
                "method.type",
                "method.type is required: supervised or dpo".into(),
            ))
        }
    };
    match ty {
        "supervised" | "dpo" => {}
        "reinforcement" => {
            return Err(method_err(
                "method.type",
                "method.type reinforcement is not supported: loraforge trains supervised and dpo"
                    .into(),
            ))
        }
        other => {
            return Err(method_err(
                "method.type",
                format!(
                    "method.type \"{}\" is not one of supervised, dpo",
                    super::cut(other, 64)
                ),
            ))
        }
    }
    if let Some(k) = m.keys().find(|k| *k != "type" && *k != ty) {
        return Err(method_err(
            &format!("method.{}", super::cut(k, 64)),
            format!(
                "method.{} does not match method.type {ty}",
                super::cut(k, 64)
            ),
        ));
    }
    if hyperparameters.is_some_and(|h| !h.is_null()) {
        return Err(method_err(
            "hyperparameters",
            format!(
                "hyperparameters given both at the top level and with method {ty}: \
                 send them once, under method.{ty}.hyperparameters"
            ),
        ));
    }
    let block = as_map(m.get(ty), &format!("method.{ty}"))?;
    if let Some(k) = block.keys().find(|k| *k != "hyperparameters") {
        return Err(method_err(
            &format!("method.{ty}.{}", super::cut(k, 64)),
            format!("method.{ty}.{} is not known", super::cut(k, 64)),
        ));
    }
    let param = format!("method.{ty}.hyperparameters");
    let mut hp = as_map(block.get("hyperparameters"), &param)?;
    if ty == "supervised" {
        return Ok((Method::Supervised, hp));
    }
    let beta = match hp.remove("beta") {
        None | Some(Value::Null) => DEFAULT_DPO_BETA,
        Some(Value::String(a)) if a == "auto" => DEFAULT_DPO_BETA,
        Some(v) => v
            .as_f64()
            .filter(|b| *b > 0.0 && *b <= 100.0)
            .ok_or_else(|| {
                method_err(
                    &format!("{param}.beta"),
                    format!("{param}.beta must be a number in (0, 100] or \"auto\""),
                )
            })?,
    };
    Ok((Method::Dpo { beta }, hp))
}

/// OpenAI's `"auto"` epochs for a training file of `examples` (its cookbook's rule): 3,
/// raised so that at least 100 examples are seen (at most 25 epochs), or lowered so
/// that at most 25,000 are (at least 1).
pub fn auto_epochs(examples: u64) -> u64 {
    let n = examples.max(1);
    if n * 3 < 100 {
        (100 / n).min(25)
    } else if n * 3 > 25_000 {
        (25_000 / n).max(1)
    } else {
        3
    }
}

/// OpenAI's `"auto"` batch size: about 0.2% of the training examples, from 1 to 256.
pub fn auto_batch_size(examples: u64) -> usize {
    ((examples as f64 * 0.002).round() as usize).clamp(1, 256)
}

/// Resolves `"auto"` epochs and batch size from the training file's size, as OpenAI
/// does. An absent key keeps loraforge's default (1 epoch, batch 4), so that a request
/// that names nothing trains as it did before `"auto"` was derived.
/// `learning_rate_multiplier: "auto"` stays 1.0: it scales PEFT's usual LoRA rate
/// (2e-4), not OpenAI's full fine-tuning rate, whose 0.05-0.2 would not fit it.
pub fn resolve_auto(spec: &mut JobSpec, hp: &serde_json::Map<String, Value>, examples: u64) {
    let auto = |k: &str| hp.get(k).and_then(|v| v.as_str()) == Some("auto");
    if auto("n_epochs") {
        spec.n_epochs = auto_epochs(examples);
    }
    if auto("batch_size") {
        spec.batch_size = auto_batch_size(examples);
    }
}

/// Validates the hyperparameters and fills every default.
pub fn parse_spec(
    hp: &serde_json::Map<String, Value>,
    seed: Option<u64>,
    metadata: Option<Value>,
    task: Task,
    method: Method,
) -> Result<JobSpec, SpecError> {
    // Packing is on unless turned off where it applies: supervised causal LM (DPO's pairs
    // and the other tasks' examples are not sequences to concatenate).
    let packs = task == Task::CausalLm && method == Method::Supervised;
    let packing = match hp.get("packing") {
        None | Some(Value::Null) => packs,
        Some(Value::Bool(true)) if !packs => {
            return Err(hp_err(
                "packing",
                "applies to supervised causal_lm jobs only",
            ))
        }
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(hp_err("packing", "must be a boolean")),
    };
    if let Some((k, why)) = OTHER_METHOD_HP.iter().find(|(k, _)| hp.contains_key(*k)) {
        return Err(hp_err(k, why));
    }
    if let Some(k) = hp.keys().find(|k| !KNOWN_HP.contains(&k.as_str())) {
        return Err(hp_err(k, "is not a known hyperparameter"));
    }
    if task != Task::TextToImage {
        if let Some(k) = hp
            .iter()
            .find(|(k, v)| IMAGE_HP.contains(&k.as_str()) && !v.is_null())
            .map(|(k, _)| k)
        {
            return Err(hp_err(k, "applies to task text_to_image only"));
        }
    }
    let prediction_type = match hp.get("prediction_type") {
        None | Some(Value::Null) => None,
        Some(Value::String(p)) if ["epsilon", "v_prediction", "sample"].contains(&p.as_str()) => {
            Some(p.clone())
        }
        Some(_) => {
            return Err(hp_err(
                "prediction_type",
                "must be epsilon, v_prediction or sample",
            ))
        }
    };
    // diffusers' SD recipe: rank 4 and alpha = rank (scale 1), whatever the rank.
    let lora_r = hp_num(
        hp,
        "lora_r",
        if task == Task::TextToImage { 4 } else { 8 },
        1,
        1024,
    )?;
    let alpha_default = if task == Task::TextToImage {
        lora_r as f64
    } else {
        16.0
    };
    let lora_alpha = hp_num(hp, "lora_alpha", alpha_default, 1e-6, 1e6)?;
    let mult = hp_num(hp, "learning_rate_multiplier", 1.0, 1e-6, 1e3)?;
    let lr = match hp.get("learning_rate") {
        None | Some(Value::Null) => BASE_LR * mult,
        _ => hp_num(hp, "learning_rate", BASE_LR, 1e-9, 1.0)?,
    };
    let targets = match hp.get("lora_target_modules") {
        None | Some(Value::Null) => for_task(task).default_targets().to_list(),
        Some(Value::String(s)) if s == "all-linear" || s == "all_linear" => "all-linear".into(),
        Some(Value::Array(a)) if !a.is_empty() => {
            let names: Option<Vec<&str>> = a.iter().map(|x| x.as_str()).collect();
            let names =
                names.ok_or_else(|| hp_err("lora_target_modules", "must list module names"))?;
            if names.iter().any(|n| n.is_empty() || n.contains(',')) {
                return Err(hp_err("lora_target_modules", "has an invalid module name"));
            }
            names.join(",")
        }
        Some(_) => {
            return Err(hp_err(
                "lora_target_modules",
                "must be a list of module names or \"all-linear\"",
            ))
        }
    };
    let conv_rank = match hp.get("conv_rank") {
        None | Some(Value::Null) => None,
        _ => Some(hp_num(hp, "conv_rank", 4usize, 1, 1024)?),
    };
    let conv_alpha = match hp.get("conv_alpha") {
        None | Some(Value::Null) => None,
        _ if conv_rank.is_none() => {
            return Err(hp_err(
                "conv_alpha",
                "needs conv_rank (the convolutions' rank)",
            ))
        }
        _ => Some(hp_num(hp, "conv_alpha", 1.0, 1e-6, 1e6)?),
    };
    let targets = match conv_rank {
        None => targets,
        Some(_) => loraforge_trainer::families::diffusion::with_locon_targets(&targets)
            .ok_or_else(|| {
                hp_err(
                    "lora_target_modules",
                    "must name modules when conv_rank is set (all-linear names no convolution)",
                )
            })?,
    };
    let scheduler = match hp.get("lr_scheduler") {
        None | Some(Value::Null) => "linear".to_string(),
        Some(Value::String(s)) if ["constant", "linear", "cosine"].contains(&s.as_str()) => {
            s.clone()
        }
        Some(_) => return Err(hp_err("lr_scheduler", "must be constant, linear or cosine")),
    };
    let opt_u64 = |name: &str| -> Result<Option<u64>, SpecError> {
        match hp.get(name) {
            None | Some(Value::Null) => Ok(None),
            _ => Ok(Some(hp_num(hp, name, 1u64, 1, 10_000_000)?)),
        }
    };
    Ok(JobSpec {
        task,
        method,
        problem_type: None,
        language: None,
        n_epochs: hp_num(hp, "n_epochs", 1u64, 1, 100)?,
        batch_size: hp_num(hp, "batch_size", 4usize, 1, 1024)?,
        learning_rate: lr,
        learning_rate_multiplier: mult,
        lora_r,
        lora_alpha,
        lora_dropout: hp_num(hp, "lora_dropout", 0.0f32, 0.0, 0.99)?,
        lora_target_modules: targets,
        use_rslora: hp_bool(hp, "use_rslora")?,
        lr_scheduler: scheduler,
        warmup_ratio: hp_num(hp, "warmup_ratio", 0.0, 0.0, 0.99)?,
        weight_decay: hp_num(hp, "weight_decay", 0.0, 0.0, 10.0)?,
        max_grad_norm: hp_num(hp, "max_grad_norm", 1.0, 0.0, 1e6)?,
        gradient_accumulation_steps: hp_num(hp, "gradient_accumulation_steps", 1usize, 1, 1024)?,
        max_seq_len: hp_num(hp, "max_seq_len", 1024usize, 2, 1 << 20)?,
        max_steps: opt_u64("max_steps")?,
        train_on_inputs: hp_bool(hp, "train_on_inputs")?,
        gradient_checkpointing: hp_bool(hp, "gradient_checkpointing")?,
        packing,
        eval_interval: opt_u64("eval_interval")?,
        checkpoint_interval: opt_u64("checkpoint_interval")?,
        seed: seed.unwrap_or(42),
        metadata,
        resolution: match hp.get("resolution") {
            None | Some(Value::Null) => None,
            _ => {
                let r = hp_num(hp, "resolution", 512u32, 8, 4096)?;
                if !r.is_multiple_of(8) {
                    return Err(hp_err("resolution", "must be a multiple of 8"));
                }
                Some(r)
            }
        },
        snr_gamma: match hp.get("snr_gamma") {
            None | Some(Value::Null) => None,
            _ => Some(hp_num(hp, "snr_gamma", 5.0, 1e-3, 1e3)?),
        },
        noise_offset: hp_num(hp, "noise_offset", 0.0, 0.0, 1.0)?,
        prediction_type,
        conv_rank,
        conv_alpha,
        keep_checkpoints: hp_num(hp, "keep_checkpoints", DEFAULT_KEEP_CHECKPOINTS, 1, 1000)?,
        dtype: match hp.get("dtype") {
            None | Some(Value::Null) => None,
            Some(Value::String(d)) => match loraforge_trainer::device::parse_dtype(d) {
                Ok(t) => Some(loraforge_trainer::device::dtype_name(t).to_string()),
                Err(_) => return Err(hp_err("dtype", "must be f32, bf16 or f16")),
            },
            Some(_) => return Err(hp_err("dtype", "must be f32, bf16 or f16")),
        },
        base_dtype: match hp.get("base_dtype") {
            None | Some(Value::Null) => None,
            Some(v) => match v.as_str().map(BaseDtype::parse) {
                Some(Ok(b)) => Some(b.name().to_string()),
                _ => {
                    return Err(hp_err(
                        "base_dtype",
                        &format!("must be one of {}", loraforge_trainer::device::BASE_DTYPES),
                    ))
                }
            },
        },
        request_sha256: None,
    })
}

/// Whether the job trains a Stable Diffusion LoRA (whose adapters come as kohya files too).
pub fn is_text_to_image(job: &JobRecord) -> bool {
    serde_json::from_str::<JobSpec>(&job.spec).is_ok_and(|s| s.task == Task::TextToImage)
}

/// The trainer's spec for a job: its model, data and output paths on this machine, and
/// the stored spec's settings.
pub fn train_spec(
    spec: &JobSpec,
    model: PathBuf,
    data: PathBuf,
    validation: Option<PathBuf>,
    out: PathBuf,
    device: &str,
    name: Option<String>,
) -> anyhow::Result<TrainSpec> {
    let mut t = TrainSpec::new(model, data, out);
    t.validation = validation;
    t.task = spec.task;
    t.method = spec.method;
    t.lora = LoraConfig {
        r: spec.lora_r,
        alpha: spec.lora_alpha,
        dropout: spec.lora_dropout,
        targets: Targets::parse(&spec.lora_target_modules)?,
        use_rslora: spec.use_rslora,
        conv_r: spec.conv_rank,
        conv_alpha: spec.conv_alpha,
        ..LoraConfig::default()
    };
    t.epochs = spec.n_epochs;
    t.max_steps = spec.max_steps;
    t.batch_size = spec.batch_size;
    t.grad_accum = spec.gradient_accumulation_steps;
    t.lr = spec.learning_rate;
    t.scheduler = spec.lr_scheduler.parse::<Scheduler>()?;
    t.warmup_ratio = spec.warmup_ratio;
    t.adamw = AdamWConfig {
        weight_decay: spec.weight_decay,
        ..AdamWConfig::default()
    };
    t.max_grad_norm = spec.max_grad_norm;
    t.max_seq_len = spec.max_seq_len;
    t.dtype = spec
        .dtype
        .as_deref()
        .map(loraforge_trainer::device::parse_dtype)
        .transpose()?;
    if let Some(b) = spec.base_dtype.as_deref() {
        t.base_dtype = BaseDtype::parse(b)?;
    }
    t.seed = spec.seed;
    t.train_on_inputs = spec.train_on_inputs;
    t.gradient_checkpointing = spec.gradient_checkpointing;
    t.packing = spec.packing;
    t.eval_every = spec.eval_interval;
    t.checkpoint_every = spec.checkpoint_interval;
    // The family reads its own settings (problem type, image settings, the adapter's
    // display name) from the stored spec; the server names none of them.
    let mut own = serde_json::to_value(spec)?;
    own["name"] = serde_json::json!(name);
    t.options = for_task(spec.task).options(&own)?;
    t.device = loraforge_trainer::device::parse(device)?;
    Ok(t)
}

#[cfg(test)]
mod tests {
    use super::{parse_method, parse_spec, Method, Task};
    use serde_json::json;

    #[test]
    fn auto_follows_openais_rule() {
        use super::{auto_batch_size, auto_epochs};
        assert_eq!(auto_epochs(12), 8);
        assert_eq!(auto_epochs(2), 25);
        assert_eq!(auto_epochs(100), 3);
        assert_eq!(auto_epochs(20_000), 1);
        assert_eq!(auto_batch_size(12), 1);
        assert_eq!(auto_batch_size(10_000), 20);
        assert_eq!(auto_batch_size(1_000_000), 256);
    }

    #[test]
    fn a_method_is_taken_as_sent_or_refused_by_name() {
        let m = |method: serde_json::Value, hp: Option<serde_json::Value>| {
            parse_method(Some(&method), hp.as_ref())
        };
        let (method, hp) = m(
            json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2}}}),
            None,
        )
        .unwrap();
        assert_eq!(method, Method::Dpo { beta: 0.2 });
        assert_eq!(hp.get("n_epochs"), Some(&json!(2)));
        assert!(!hp.contains_key("beta"));
        let (method, _) = m(json!({"type": "dpo"}), None).unwrap();
        assert_eq!(method, Method::Dpo { beta: 0.1 });
        let (method, hp) = m(
            json!({"type": "supervised", "supervised": {"hyperparameters": {"lora_r": 4}}}),
            None,
        )
        .unwrap();
        assert_eq!(
            (method, hp.get("lora_r")),
            (Method::Supervised, Some(&json!(4)))
        );
        let (method, hp) = parse_method(None, Some(&json!({"lora_r": 2}))).unwrap();
        assert_eq!(
            (method, hp.get("lora_r")),
            (Method::Supervised, Some(&json!(2)))
        );
        let refused = |method: serde_json::Value, hp: Option<serde_json::Value>, param: &str| {
            let e = m(method.clone(), hp).unwrap_err();
            assert_eq!(e.param, param, "{method}: {e:?}");
        };
        refused(json!({"type": "reinforcement"}), None, "method.type");
        refused(json!({"type": "ppo"}), None, "method.type");
        refused(json!({}), None, "method.type");
        refused(
            json!({"type": "supervised", "dpo": {"hyperparameters": {"beta": 0.1}}}),
            None,
            "method.dpo",
        );
        refused(
            json!({"type": "dpo", "dpo": {}}),
            Some(json!({"n_epochs": 1})),
            "hyperparameters",
        );
        refused(
            json!({"type": "dpo", "dpo": {"hyperparameters": {"beta": -1}}}),
            None,
            "method.dpo.hyperparameters.beta",
        );
        refused(
            json!({"type": "dpo", "dpo": {"hyperparams": {}}}),
            None,
            "method.dpo.hyperparams",
        );
    }

    #[test]
    fn conv_rank_adds_the_locon_modules_and_is_refused_where_it_cannot_apply() {
        let spec = |v: serde_json::Value, task| {
            parse_spec(v.as_object().unwrap(), None, None, task, Method::Supervised)
        };
        let s = spec(
            json!({"conv_rank": 8, "conv_alpha": 4, "lora_target_modules": ["to_q", "conv1"]}),
            Task::TextToImage,
        )
        .unwrap();
        assert_eq!((s.conv_rank, s.conv_alpha), (Some(8), Some(4.0)));
        assert_eq!(
            s.lora_target_modules,
            "to_q,conv1,conv2,conv_shortcut,time_emb_proj,downsamplers.0.conv,upsamplers.0.conv"
        );
        let s = spec(json!({}), Task::TextToImage).unwrap();
        assert_eq!(
            (s.conv_rank, s.lora_target_modules.as_str()),
            (None, "to_q,to_k,to_v,to_out.0")
        );
        let refused = |v: serde_json::Value, task, param: &str| {
            let e = spec(v.clone(), task).unwrap_err();
            assert_eq!(e.param, format!("hyperparameters.{param}"), "{v}: {e:?}");
        };
        refused(json!({"conv_rank": 4}), Task::CausalLm, "conv_rank");
        refused(json!({"conv_alpha": 4}), Task::TextToImage, "conv_alpha");
        refused(json!({"conv_rank": 0}), Task::TextToImage, "conv_rank");
        refused(
            json!({"conv_rank": 4, "lora_target_modules": "all-linear"}),
            Task::TextToImage,
            "lora_target_modules",
        );
    }

    #[test]
    fn keys_we_do_not_honour_are_refused_by_name() {
        let spec = |v: serde_json::Value| {
            parse_spec(
                v.as_object().unwrap(),
                None,
                None,
                Task::CausalLm,
                Method::Supervised,
            )
        };
        // DPO's beta would be silently ignored by supervised training: refuse it.
        let e = spec(json!({"beta": 0.1})).unwrap_err();
        assert_eq!(e.param, "hyperparameters.beta", "{e:?}");
        assert!(e.message.contains("method dpo"), "{e:?}");
        let e = spec(json!({"lora_rank": 8})).unwrap_err();
        assert_eq!(e.param, "hyperparameters.lora_rank", "{e:?}");
        assert!(spec(json!({"lora_r": 8})).is_ok());
    }

    #[test]
    fn packing_is_on_for_supervised_causal_lm_and_refused_where_it_cannot_apply() {
        let hp = |v: serde_json::Value| v.as_object().unwrap().clone();
        let dpo = Method::Dpo { beta: 0.1 };
        let spec = |v, task, method| parse_spec(&hp(v), None, None, task, method);
        let sft = Method::Supervised;
        let packs = |v, task, method| spec(v, task, method).unwrap().packing;
        assert!(packs(json!({}), Task::CausalLm, sft));
        assert!(!packs(json!({"packing": false}), Task::CausalLm, sft));
        assert!(!packs(json!({}), Task::CausalLm, dpo));
        assert!(!packs(json!({}), Task::SequenceClassification, sft));
        assert!(!packs(json!({"packing": false}), Task::TextToImage, sft));
        for (task, method) in [
            (Task::CausalLm, dpo),
            (Task::SequenceClassification, sft),
            (Task::TextToImage, sft),
        ] {
            let e = spec(json!({"packing": true}), task, method).unwrap_err();
            assert_eq!(e.param, "hyperparameters.packing", "{e:?}");
            assert!(e.message.contains("supervised causal_lm"), "{e:?}");
        }
        let e = spec(json!({"packing": "yes"}), Task::CausalLm, sft).unwrap_err();
        assert_eq!(e.param, "hyperparameters.packing", "{e:?}");
        // A spec stored before packing existed trains unpacked.
        let mut stored =
            serde_json::to_value(spec(json!({}), Task::CausalLm, sft).unwrap()).unwrap();
        stored.as_object_mut().unwrap().remove("packing");
        let old: super::JobSpec = serde_json::from_value(stored).unwrap();
        assert!(!old.packing);
    }
}
