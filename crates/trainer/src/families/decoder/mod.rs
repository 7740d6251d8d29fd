//! Llama-family decoders (llama, mistral, qwen2, qwen3, phi3): config, model, loading (HF
//! folders and GGUF), tokenizer and chat template, generation, merging an adapter into
//! the base, and adapters as llama.cpp's LoRA GGUF.

pub mod config;
pub mod export;
pub mod generate;
pub mod loader;
pub mod merge;
pub mod model;
pub mod objective;
pub mod template;
pub mod tokenize;

use super::family::{check_targets, Family, Field, JobCheck, Named, Refusal};
use crate::data::DataFormat;
use crate::device::{BaseDtype, DType};
use crate::lora::Targets;
use crate::train::{self, FamilyOptions, Method, Task, TrainEvent, TrainOutcome, TrainSpec};
use crate::Result;
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// The `model_type`s this family builds.
pub const ARCHITECTURES: [&str; 8] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "phi3",
    "gemma2",
    "gemma3_text",
    "smollm3",
];

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

/// The same for models that fuse q/k/v and gate/up (phi3): PEFT targets the fused modules.
pub const FUSED_TARGETS: [&str; 4] = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"];

/// Causal language modelling on llama-family decoders.
pub struct DecoderFamily;

impl Family for DecoderFamily {
    fn name(&self) -> &'static str {
        "decoder"
    }
    fn dtypes(&self) -> &'static [DType] {
        &[DType::F32, DType::BF16, DType::F16]
    }
    /// The LoRA GGUF llama.cpp loads, where the architecture has one.
    fn adapter_files(&self) -> &'static [&'static str] {
        &[export::LORA_GGUF_FILE]
    }
    /// Weights from the config's shapes and `base_dtype` (a GGUF file's own bytes under
    /// `auto`); per layer and token a step keeps about
    /// `10·hidden + 4·intermediate` values (the projections' outputs, norms, residuals,
    /// the MLP's three wide tensors), attention keeps no `t × t` matrix, and the loss
    /// holds 128 rows of f32 logits at a time (three copies while it works).
    fn estimate_memory(
        &self,
        model: &Path,
        job: &serde_json::Value,
        dtype: DType,
    ) -> Option<super::family::MemoryEstimate> {
        let base = match job.get("base_dtype").and_then(|v| v.as_str()) {
            Some(b) => BaseDtype::parse(b).ok()?,
            None => BaseDtype::Auto,
        };
        let (cfg, stored) = model_shape(model)?;
        let num = |k: &str, d: u64| job.get(k).and_then(|v| v.as_u64()).unwrap_or(d);
        let (batch, seq) = (num("batch_size", 4), num("max_seq_len", 1024));
        // A DPO batch of pairs runs twice as many sequences (chosen and rejected).
        let dpo = job.pointer("/method/type").and_then(|t| t.as_str()) == Some("dpo");
        let batch = if dpo { 2 * batch } else { batch };
        let seq = seq.min(cfg.max_position_embeddings as u64);
        let (h, i, v, l) = (
            cfg.hidden_size as u64,
            cfg.intermediate_size as u64,
            cfg.vocab_size as u64,
            cfg.num_hidden_layers as u64,
        );
        let kv = (cfg.num_key_value_heads * cfg.head_dim) as u64;
        let q = (cfg.num_attention_heads * cfg.head_dim) as u64;
        let per_layer = h * q + 2 * h * kv + q * h + 3 * h * i;
        let tables = v * h * if cfg.tie_word_embeddings { 1 } else { 2 };
        let matrices = l * per_layer + tables;
        let norms = (if cfg.sandwich_norms { 4 } else { 2 } * l + 1) * h * 4;
        let bytes = crate::device::dtype_bytes(dtype);
        let packed = |kind| crate::device::ggml_bytes(kind, matrices) + norms;
        let (weights, expands) = match (base, stored) {
            (BaseDtype::Dense, _) | (BaseDtype::Auto, None) => (matrices * bytes + norms, false),
            (BaseDtype::Auto, Some(file_bytes)) => (file_bytes, true),
            (BaseDtype::Packed(kind), _) => (packed(kind), true),
        };
        // A packed base expands one matrix at a time; the loss expands the output head
        // whole when that is small or its logits are soft-capped (gemma2: full logits),
        // else in blocks of vocabulary rows.
        let head = if v * h * bytes > model::HEAD_WHOLE_BYTES as u64
            && cfg.final_logit_softcapping.is_none()
        {
            model::HEAD_BLOCK_ELEMS as u64
        } else {
            v * h
        };
        let scratch = if expands {
            2 * head.max(i * h) * bytes
        } else {
            0
        };
        let tokens = batch.saturating_mul(seq);
        // Checkpointing keeps each layer's f32 input, and one layer's activations while
        // it recomputes.
        let checkpointing =
            job.get("gradient_checkpointing").and_then(|v| v.as_bool()) == Some(true);
        let kept = if checkpointing {
            l * h * 4 + (10 * h + 4 * i) * bytes
        } else {
            l * (10 * h + 4 * i) * bytes
        };
        // Soft-capping (gemma2) keeps what the fused ops do not: every layer's scores and
        // probabilities (`t × t` a head, f32; one layer's with checkpointing), and every
        // scored row's logits.
        let score_layers = if checkpointing { 1 } else { l };
        let heads = cfg.num_attention_heads as u64;
        let capped_scores = match cfg.attn_logit_softcapping {
            Some(_) => score_layers * batch * heads * seq * seq * 4 * 4,
            None => 0,
        };
        let logits = match cfg.final_logit_softcapping {
            Some(_) => tokens.saturating_mul(v * 4 * 4),
            None => 3 * 128 * v * 4,
        };
        Some(super::family::MemoryEstimate {
            weights: weights + scratch,
            activations: tokens
                .saturating_mul(kept)
                .saturating_add(logits)
                .saturating_add(capped_scores),
        })
    }
    fn packs_base(&self) -> bool {
        true
    }
    /// bf16 on a GPU, as PEFT users run a frozen base there; f32 on the CPU, where
    /// candle's half-precision products are slow.
    fn default_dtype(&self, on_gpu: bool) -> DType {
        if on_gpu {
            DType::BF16
        } else {
            DType::F32
        }
    }
    fn task(&self) -> Task {
        Task::CausalLm
    }
    fn architectures(&self) -> &'static [&'static str] {
        &ARCHITECTURES
    }
    /// The data is read for its tool definitions and calls: a template that would not
    /// print them is refused at creation (see [`check_tools`]).
    fn checks_data(&self) -> bool {
        true
    }
    fn check_job(&self, job: &JobCheck) -> std::result::Result<(), Refusal> {
        check_targets(job, &module_paths(job.model))?;
        let files = [
            (job.training, Field::TrainingFile),
            (job.validation, Field::ValidationFile),
        ];
        let mut tokenizer = None;
        for (named, field) in files {
            let Some(named) = named else { continue };
            check_tools(job, named, field, &mut tokenizer)?;
        }
        Ok(())
    }
    fn data_formats(&self) -> &'static [DataFormat] {
        &[
            DataFormat::Chat,
            DataFormat::PromptCompletion,
            DataFormat::Text,
            DataFormat::Tokenized,
            DataFormat::Preference,
        ]
    }
    fn default_targets(&self) -> Targets {
        Targets::Names(TARGETS.iter().map(|s| s.to_string()).collect())
    }
    /// Every projection of the model at hand: the fused ones where it fuses them.
    fn default_targets_for(&self, model: &Path) -> Targets {
        match model_shape(model) {
            Some((cfg, _)) if cfg.fused_projections => {
                Targets::Names(FUSED_TARGETS.iter().map(|s| s.to_string()).collect())
            }
            _ => self.default_targets(),
        }
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
        let resume = resume.map(Path::to_path_buf);
        match spec.method {
            Method::Supervised => {
                let obj = objective::CausalLm::load(spec)?;
                train::run(obj, spec, resume, cancel, on_event)
            }
            Method::Dpo { beta } => {
                let obj = objective::Dpo::load(spec, beta)?;
                train::run(obj, spec, resume, cancel, on_event)
            }
        }
    }
}

/// A base's config, and for a GGUF file the bytes its tensors take as stored; `None`
/// when neither can be read.
fn model_shape(model: &Path) -> Option<(config::DecoderConfig, Option<u64>)> {
    if model.is_dir() {
        let v = crate::io::read_json(&model.join("config.json")).ok()?;
        return Some((config::DecoderConfig::from_hf_json(&v).ok()?, None));
    }
    let mut f = std::fs::File::open(model).ok()?;
    let ct = candle_core::quantized::gguf_file::Content::read(&mut f).ok()?;
    let cfg = loader::gguf_config(&ct).ok()?;
    let stored = ct
        .tensor_infos
        .values()
        .map(|t| crate::device::ggml_bytes(t.ggml_dtype, t.shape.elem_count() as u64))
        .sum();
    Some((cfg, Some(stored)))
}

/// The paths of a model folder's linear modules, from its `config.json` (none for a
/// GGUF file or a config that cannot be read: then nothing is checked here).
fn module_paths(model: &Path) -> Vec<String> {
    let Ok(v) = crate::io::read_json::<serde_json::Value>(&model.join("config.json")) else {
        return Vec::new();
    };
    let Ok(cfg) = config::DecoderConfig::from_hf_json(&v) else {
        return Vec::new();
    };
    let modules: &[&str] = if cfg.fused_projections {
        &[
            "self_attn.qkv_proj",
            "self_attn.o_proj",
            "mlp.gate_up_proj",
            "mlp.down_proj",
        ]
    } else {
        &[
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
        ]
    };
    let mut out = Vec::new();
    for i in 0..cfg.num_hidden_layers {
        for m in modules {
            out.push(format!("model.layers.{i}.{m}"));
        }
    }
    if !cfg.tie_word_embeddings {
        out.push("lm_head".into());
    }
    out
}

/// Refuses a file with tool definitions or tool calls that the model's chat template
/// would not print, naming the model and the first such line. The tokenizer is loaded
/// (once, without the weights) only when a line has tools.
fn check_tools(
    job: &JobCheck,
    file: Named,
    field: Field,
    tokenizer: &mut Option<tokenize::TokenizerBundle>,
) -> std::result::Result<(), Refusal> {
    for (i, line) in file.text.lines().enumerate() {
        if !line.contains("\"tools\"") && !line.contains("\"tool_calls\"") {
            continue;
        }
        // Lines that do not parse were refused at upload; the worker reports them.
        let Ok(ex) = crate::data::parse_line(crate::data::without_bom(i as u64 + 1, line)) else {
            continue;
        };
        if tokenizer.is_none() {
            // A model whose tokenizer cannot be read fails in the worker, saying why.
            let Ok(t) = loader::load_tokenizer(job.model) else {
                return Ok(());
            };
            *tokenizer = Some(t);
        }
        let t = tokenizer.as_ref().expect("loaded above");
        if let Err(e) = t.check_tools(&ex) {
            let m = e.to_string();
            return Err(Refusal {
                field,
                message: format!(
                    "{} line {}: model {}: {}",
                    file.name,
                    i + 1,
                    job.model_id,
                    m.strip_prefix("chat template: ").unwrap_or(&m)
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{DecoderFamily, Family};
    use crate::device::DType;
    use std::path::Path;

    /// With no targets named, a model that fuses its projections gets the fused ones.
    #[test]
    fn default_targets_follow_the_models_layout() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
        let names = |m: &str| {
            DecoderFamily
                .default_targets_for(&fixtures.join(m))
                .to_list()
        };
        assert_eq!(names("tiny-phi3"), "qkv_proj,o_proj,gate_up_proj,down_proj");
        assert_eq!(
            names("tiny-llama"),
            "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
        );
    }

    /// A DPO step holds two sequences per pair: the estimate counts them.
    #[test]
    fn a_dpo_job_is_estimated_with_both_sequences_of_each_pair() {
        let model = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-llama");
        let est = |job: serde_json::Value| {
            DecoderFamily
                .estimate_memory(&model, &job, DType::F32)
                .expect("an estimate")
        };
        let sft = est(serde_json::json!({"batch_size": 2, "max_seq_len": 64}));
        let dpo = est(serde_json::json!({"batch_size": 2, "max_seq_len": 64,
                                         "method": {"type": "dpo", "beta": 0.1}}));
        let sft4 = est(serde_json::json!({"batch_size": 4, "max_seq_len": 64}));
        assert_eq!(dpo.weights, sft.weights);
        assert_eq!(dpo.activations, sft4.activations);
        assert!(dpo.activations > sft.activations);
    }
}
