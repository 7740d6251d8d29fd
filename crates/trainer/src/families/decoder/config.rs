//! Decoder configuration, read from HF `config.json` or GGUF metadata.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Llama 3's frequency-dependent RoPE rescaling.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Llama3Rope {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_position_embeddings: f64,
}

/// Everything the llama-family decoder needs (llama, mistral, qwen2, qwen3, phi3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub llama3_rope: Option<Llama3Rope>,
    /// Per-frequency divisors (GGUF `rope_freqs.weight`), an alternative to `llama3_rope`.
    #[serde(skip)]
    pub rope_freq_factors: Option<Vec<f32>>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry biases (qwen2, or llama with `attention_bias`).
    pub qkv_bias: bool,
    /// o_proj carries a bias (llama `attention_bias`).
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Each head's queries and keys are RMS-normalised (with their own `head_dim`
    /// weights) before the rotation (qwen3).
    #[serde(default)]
    pub qk_norm: bool,
    /// q/k/v are one `qkv_proj` and gate/up one `gate_up_proj` (gate first) (phi3).
    #[serde(default)]
    pub fused_projections: bool,
    /// Each query sees only the keys less than this many positions behind it (mistral,
    /// phi3: transformers applies their config's `sliding_window`).
    #[serde(default)]
    pub sliding_window: Option<usize>,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

pub(crate) fn get_usize(v: &Value, key: &str) -> Result<usize> {
    v.get(key)
        .and_then(|x| x.as_u64())
        .map(|x| x as usize)
        .ok_or_else(|| Error::Config(format!("config.json: missing or invalid \"{key}\"")))
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|x| vec![x as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|x| x as u32)
            .collect(),
        _ => Vec::new(),
    }
}

impl DecoderConfig {
    /// Parses a HF `config.json` of a supported decoder.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v
            .get("model_type")
            .and_then(|x| x.as_str())
            .ok_or_else(|| Error::Config("config.json: no \"model_type\"".into()))?
            .to_string();
        if !super::ARCHITECTURES.contains(&model_type.as_str()) {
            return Err(Error::Unsupported(format!(
                "model_type \"{model_type}\" (supported: {})",
                super::ARCHITECTURES.join(", ")
            )));
        }
        let hidden_size = get_usize(v, "hidden_size")?;
        let num_attention_heads = get_usize(v, "num_attention_heads")?;
        let num_key_value_heads = v
            .get("num_key_value_heads")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(num_attention_heads);
        let head_dim = v
            .get("head_dim")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(hidden_size / num_attention_heads);
        // transformers 5 moved rope settings under `rope_parameters`; older files keep
        // `rope_theta`/`rope_scaling` at the top level. Read both.
        let rope_params = v.get("rope_parameters");
        let rope_theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|x| x.as_f64())
            })
            .unwrap_or(10000.0);
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or(rope_params);
        let llama3_rope = match scaling {
            Some(s) => {
                let ty = s
                    .get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|x| x.as_str())
                    .unwrap_or("default");
                match ty {
                    "default" => None,
                    "llama3" => {
                        let f = |k: &str| {
                            s.get(k).and_then(|x| x.as_f64()).ok_or_else(|| {
                                Error::Config(format!("config.json: rope_scaling.{k} missing"))
                            })
                        };
                        Some(Llama3Rope {
                            factor: f("factor")?,
                            low_freq_factor: f("low_freq_factor")?,
                            high_freq_factor: f("high_freq_factor")?,
                            original_max_position_embeddings: f(
                                "original_max_position_embeddings",
                            )?,
                        })
                    }
                    other => {
                        return Err(Error::Unsupported(format!("rope scaling type \"{other}\"")))
                    }
                }
            }
            None => None,
        };
        let attention_bias = v
            .get("attention_bias")
            .and_then(|x| x.as_bool())
            .unwrap_or(false);
        let qwen2 = model_type == "qwen2";
        let phi3 = model_type == "phi3";
        // phi3's dropout inside the base (transformers applies it in training) and partial
        // rotation (phi-4-mini) are not built: refused by name rather than ignored.
        for key in ["resid_pdrop", "embd_pdrop", "attention_dropout"] {
            if let Some(p) = v.get(key).and_then(|x| x.as_f64()).filter(|p| *p != 0.0) {
                return Err(Error::Unsupported(format!(
                    "config.json: {key} {p} (dropout inside the base model)"
                )));
            }
        }
        let partial = v
            .get("partial_rotary_factor")
            .or_else(|| rope_params.and_then(|p| p.get("partial_rotary_factor")));
        if let Some(f) = partial.and_then(|x| x.as_f64()).filter(|f| *f != 1.0) {
            return Err(Error::Unsupported(format!(
                "config.json: partial_rotary_factor {f} (rotation of part of each head)"
            )));
        }
        let sliding_window = if model_type == "mistral" || phi3 {
            v.get("sliding_window")
                .and_then(|x| x.as_u64())
                .map(|w| w as usize)
        } else {
            None
        };
        // Qwen3 declares a sliding window it only uses when asked to.
        if v.get("use_sliding_window").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::Unsupported(
                "config.json: use_sliding_window (sliding-window attention)".into(),
            ));
        }
        Ok(Self {
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            intermediate_size: get_usize(v, "intermediate_size")?,
            num_hidden_layers: get_usize(v, "num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta,
            llama3_rope,
            rope_freq_factors: None,
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(2048) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            qk_norm: model_type == "qwen3",
            fused_projections: phi3,
            sliding_window,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            model_type,
        })
    }

    /// Inverse frequencies of the rotary embedding, with llama3 rescaling applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let dim = self.head_dim;
        let mut inv: Vec<f64> = (0..dim)
            .step_by(2)
            .map(|i| 1.0 / self.rope_theta.powf(i as f64 / dim as f64))
            .collect();
        if let Some(r) = &self.llama3_rope {
            let low_wavelen = r.original_max_position_embeddings / r.low_freq_factor;
            let high_wavelen = r.original_max_position_embeddings / r.high_freq_factor;
            for f in inv.iter_mut() {
                let wavelen = 2.0 * std::f64::consts::PI / *f;
                if wavelen > low_wavelen {
                    *f /= r.factor;
                } else if wavelen >= high_wavelen {
                    let smooth = (r.original_max_position_embeddings / wavelen - r.low_freq_factor)
                        / (r.high_freq_factor - r.low_freq_factor);
                    *f = (1.0 - smooth) * *f / r.factor + smooth * *f;
                }
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= *d as f64;
            }
        }
        inv.into_iter().map(|x| x as f32).collect()
    }
}
