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

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MlpActivation {
    /// SwiGLU (`silu`): llama, mistral, qwen, phi3.
    #[default]
    Silu,
    /// GeGLU with transformers' `gelu_pytorch_tanh` (gemma).
    GeluTanh,
}

/// Everything the llama-family decoder needs (llama, mistral, qwen2, qwen3, phi3,
/// gemma2, gemma3 text, smollm3).
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
    /// Linear RoPE scaling (position interpolation): every frequency divided by this.
    #[serde(default)]
    pub rope_linear_factor: Option<f64>,
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
    /// Which layers the window applies to, when not all of them (gemma3's
    /// `layer_types`: `true` for a `sliding_attention` layer).
    #[serde(default)]
    pub sliding_layers: Option<Vec<bool>>,
    /// The RoPE base of the windowed layers, when it differs from `rope_theta`
    /// (gemma3's local base, 10 000 against the global 1 000 000).
    #[serde(default)]
    pub local_rope_theta: Option<f64>,
    /// Norm weights are offsets from one: each norm multiplies by `1 + w` (gemma).
    #[serde(default)]
    pub norm_unit_offset: bool,
    /// The embedded rows are multiplied by `sqrt(hidden_size)` before the first layer
    /// (gemma; the tied output head uses the table unscaled).
    #[serde(default)]
    pub scale_embeddings: bool,
    /// Four norms a layer: the attention's and the MLP's outputs are normed too before
    /// they join the residual stream (gemma2/3).
    #[serde(default)]
    pub sandwich_norms: bool,
    #[serde(default)]
    pub mlp_activation: MlpActivation,
    /// Attention scores scale by `query_pre_attn_scalar^-1/2` rather than
    /// `head_dim^-1/2` (gemma).
    #[serde(default)]
    pub query_pre_attn_scalar: Option<f64>,
    /// Attention scores pass through `cap · tanh(s / cap)` before the mask (gemma2).
    #[serde(default)]
    pub attn_logit_softcapping: Option<f64>,
    /// The logits pass through `cap · tanh(l / cap)` (gemma2).
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// Which layers rotate queries and keys, when not all (smollm3's `no_rope_layers`:
    /// every fourth layer attends without positions, "NoPE").
    #[serde(default)]
    pub rope_layers: Option<Vec<bool>>,
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
        let gemma3 = model_type == "gemma3_text";
        let gemma = gemma3 || model_type == "gemma2";
        if gemma {
            if v.get("use_bidirectional_attention")
                .and_then(|x| x.as_bool())
                == Some(true)
            {
                return Err(Error::Unsupported(
                    "config.json: use_bidirectional_attention (an encoder, not a causal decoder)"
                        .into(),
                ));
            }
            let act = v
                .get("hidden_activation")
                .and_then(|x| x.as_str())
                .unwrap_or("gelu_pytorch_tanh");
            if act != "gelu_pytorch_tanh" {
                return Err(Error::Unsupported(format!(
                    "config.json: hidden_activation \"{act}\""
                )));
            }
        }
        let head_dim = v
            .get("head_dim")
            .and_then(|x| x.as_u64())
            .map(|x| x as usize)
            .unwrap_or(if gemma {
                256
            } else {
                hidden_size / num_attention_heads
            });
        // transformers 5 moved rope settings under `rope_parameters` (gemma3: one set per
        // layer type); older files keep `rope_theta`/`rope_scaling` at the top level.
        // Read both.
        let mut rope_params = v.get("rope_parameters").filter(|p| !p.is_null());
        let mut local_rope = None;
        if let Some(full) = rope_params.and_then(|p| p.get("full_attention")) {
            local_rope = rope_params.and_then(|p| p.get("sliding_attention"));
            rope_params = Some(full);
        }
        let rope_theta = v
            .get("rope_theta")
            .and_then(|x| x.as_f64())
            .or_else(|| {
                rope_params
                    .and_then(|p| p.get("rope_theta"))
                    .and_then(|x| x.as_f64())
            })
            .unwrap_or(match model_type.as_str() {
                "gemma3_text" => 1_000_000.0,
                "smollm3" => 2_000_000.0,
                _ => 10_000.0,
            });
        let scaling = v
            .get("rope_scaling")
            .filter(|s| !s.is_null())
            .or(rope_params);
        let (llama3_rope, rope_linear_factor) = match scaling {
            Some(s) => rope_scaling(s)?,
            None => (None, None),
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
        let num_hidden_layers = get_usize(v, "num_hidden_layers")?;
        let (sliding_window, sliding_layers, local_rope_theta) = if gemma {
            // gemma2 turns every other layer global and rotates all alike; gemma3 every
            // sixth, its windowed layers with a base of their own.
            let pattern = if gemma3 { 6 } else { 2 };
            let local = local_rope
                .map(|r| match rope_scaling(r)? {
                    (None, None) => Ok(r.get("rope_theta").and_then(|x| x.as_f64())),
                    _ => Err(Error::Unsupported(
                        "config.json: rope scaling on sliding_attention layers".into(),
                    )),
                })
                .transpose()?
                .flatten()
                .or_else(|| v.get("rope_local_base_freq").and_then(|x| x.as_f64()))
                .or(gemma3.then_some(10_000.0));
            let window = number_or(v, "sliding_window", Some(4096.0)).map(|w| w as usize);
            let kinds = gemma_layer_types(v, num_hidden_layers, pattern)?;
            (window, Some(kinds), local)
        } else {
            (sliding_window, None, None)
        };
        let rope_layers = if model_type == "smollm3" {
            Some(smollm3_rope_layers(v, num_hidden_layers)?)
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
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(1e-6),
            rope_theta,
            llama3_rope,
            rope_linear_factor,
            rope_freq_factors: None,
            // The defaults are the config classes' own, for files that leave keys out.
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|x| x.as_u64())
                .unwrap_or(match model_type.as_str() {
                    "gemma2" => 8192,
                    "gemma3_text" => 131_072,
                    "smollm3" => 32_768,
                    _ => 2048,
                }) as usize,
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|x| x.as_bool())
                .unwrap_or(gemma || model_type == "smollm3"),
            qkv_bias: qwen2 || attention_bias,
            o_bias: !qwen2 && attention_bias,
            mlp_bias: v.get("mlp_bias").and_then(|x| x.as_bool()).unwrap_or(false),
            qk_norm: model_type == "qwen3" || gemma3,
            fused_projections: phi3,
            sliding_window,
            sliding_layers,
            local_rope_theta,
            norm_unit_offset: gemma,
            scale_embeddings: gemma,
            sandwich_norms: gemma,
            mlp_activation: if gemma {
                MlpActivation::GeluTanh
            } else {
                MlpActivation::Silu
            },
            query_pre_attn_scalar: if gemma {
                Some(
                    v.get("query_pre_attn_scalar")
                        .and_then(|x| x.as_f64())
                        .unwrap_or(256.0),
                )
            } else {
                None
            },
            // gemma2 caps unless its file says null; gemma3 only where its file asks.
            attn_logit_softcapping: gemma
                .then(|| number_or(v, "attn_logit_softcapping", (!gemma3).then_some(50.0)))
                .flatten(),
            final_logit_softcapping: gemma
                .then(|| number_or(v, "final_logit_softcapping", (!gemma3).then_some(30.0)))
                .flatten(),
            rope_layers,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            pad_token_id: token_ids(v.get("pad_token_id")).first().copied(),
            model_type,
        })
    }

    /// Inverse frequencies of the rotary embedding, with llama3 or linear rescaling
    /// applied.
    pub fn inv_freq(&self) -> Vec<f32> {
        let mut inv = default_inv_freq(self.rope_theta, self.head_dim);
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
        if let Some(factor) = self.rope_linear_factor {
            for f in inv.iter_mut() {
                *f /= factor;
            }
        }
        if let Some(factors) = &self.rope_freq_factors {
            for (f, d) in inv.iter_mut().zip(factors) {
                *f /= *d as f64;
            }
        }
        inv.into_iter().map(|x| x as f32).collect()
    }

    /// The windowed layers' inverse frequencies, where their base differs.
    pub fn local_inv_freq(&self) -> Option<Vec<f32>> {
        let theta = self.local_rope_theta?;
        Some(
            default_inv_freq(theta, self.head_dim)
                .into_iter()
                .map(|x| x as f32)
                .collect(),
        )
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn layer_is_sliding(&self, i: usize) -> bool {
        self.sliding_window.is_some()
            && self
                .sliding_layers
                .as_ref()
                .is_none_or(|l| l.get(i).copied().unwrap_or(false))
    }

    /// Whether layer `i` rotates its queries and keys.
    pub fn layer_rotates(&self, i: usize) -> bool {
        self.rope_layers
            .as_ref()
            .is_none_or(|l| l.get(i).copied().unwrap_or(true))
    }

    /// The attention scores' scale.
    pub fn attention_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(s) => 1.0 / s.sqrt(),
            None => 1.0 / (self.head_dim as f64).sqrt(),
        }
    }
}

/// A number of the config: `default` when the key is absent, `None` when it is null.
fn number_or(v: &Value, key: &str, default: Option<f64>) -> Option<f64> {
    match v.get(key) {
        None => default,
        Some(x) => x.as_f64(),
    }
}

/// `1 / theta^(i / dim)` for even `i`, RoPE's unscaled frequencies.
fn default_inv_freq(theta: f64, dim: usize) -> Vec<f64> {
    (0..dim)
        .step_by(2)
        .map(|i| 1.0 / theta.powf(i as f64 / dim as f64))
        .collect()
}

/// A rope-scaling block: llama3's frequency-dependent rescaling or linear
/// interpolation; `default` is none.
fn rope_scaling(s: &Value) -> Result<(Option<Llama3Rope>, Option<f64>)> {
    let ty = s
        .get("rope_type")
        .or_else(|| s.get("type"))
        .and_then(|x| x.as_str())
        .unwrap_or("default");
    let f = |k: &str| {
        s.get(k)
            .and_then(|x| x.as_f64())
            .ok_or_else(|| Error::Config(format!("config.json: rope_scaling.{k} missing")))
    };
    match ty {
        "default" => Ok((None, None)),
        "linear" => Ok((None, Some(f("factor")?))),
        "llama3" => Ok((
            Some(Llama3Rope {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            }),
            None,
        )),
        other => Err(Error::Unsupported(format!("rope scaling type \"{other}\""))),
    }
}

/// smollm3's `no_rope_layers` (1 where a layer rotates, 0 where it does not), or when
/// absent every `no_rope_layer_interval`-th layer (4) without rotation: `true` to rotate.
fn smollm3_rope_layers(v: &Value, layers: usize) -> Result<Vec<bool>> {
    let Some(flags) = v.get("no_rope_layers").and_then(|x| x.as_array()) else {
        let every = v
            .get("no_rope_layer_interval")
            .and_then(|x| x.as_u64())
            .unwrap_or(4)
            .max(1) as usize;
        return Ok((0..layers).map(|i| (i + 1) % every != 0).collect());
    };
    if flags.len() != layers {
        return Err(Error::Config(format!(
            "config.json: no_rope_layers has {} entries for {layers} layers",
            flags.len()
        )));
    }
    flags
        .iter()
        .map(|f| match f.as_u64() {
            Some(1) => Ok(true),
            Some(0) => Ok(false),
            _ => Err(Error::Config(format!(
                "config.json: no_rope_layers entry {f} (0 or 1)"
            ))),
        })
        .collect()
}

/// gemma's `layer_types` (or, in older files, every `sliding_window_pattern`-th layer
/// global and the rest windowed, every `pattern`-th when the file does not say): `true`
/// for a windowed layer.
fn gemma_layer_types(v: &Value, layers: usize, pattern: u64) -> Result<Vec<bool>> {
    let Some(types) = v.get("layer_types").and_then(|x| x.as_array()) else {
        let pattern = v
            .get("sliding_window_pattern")
            .and_then(|x| x.as_u64())
            .unwrap_or(pattern)
            .max(1) as usize;
        return Ok((0..layers).map(|i| (i + 1) % pattern != 0).collect());
    };
    if types.len() != layers {
        return Err(Error::Config(format!(
            "config.json: layer_types has {} entries for {layers} layers",
            types.len()
        )));
    }
    types
        .iter()
        .map(|t| match t.as_str() {
            Some("sliding_attention") => Ok(true),
            Some("full_attention") => Ok(false),
            other => Err(Error::Unsupported(format!(
                "config.json: layer_types entry {other:?}"
            ))),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// google/gemma-3-1b-it's config.json as transformers 4.50 wrote it: the rope bases at
    /// the top level and the layer kinds as a pattern (every sixth layer global).
    fn gemma3_1b() -> Value {
        json!({
            "architectures": ["Gemma3ForCausalLM"], "attention_bias": false,
            "attention_dropout": 0.0, "attn_logit_softcapping": null, "bos_token_id": 2,
            "eos_token_id": [1, 106], "final_logit_softcapping": null, "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 1152,
            "intermediate_size": 6912, "max_position_embeddings": 32768,
            "model_type": "gemma3_text", "num_attention_heads": 4, "num_hidden_layers": 26,
            "num_key_value_heads": 1, "pad_token_id": 0, "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06, "rope_local_base_freq": 10000, "rope_scaling": null,
            "rope_theta": 1000000, "sliding_window": 512, "sliding_window_pattern": 6,
            "torch_dtype": "bfloat16", "vocab_size": 262144
        })
    }

    #[test]
    fn gemma3_hub_config_reads_its_layer_kinds_and_rope_bases() {
        let c = DecoderConfig::from_hf_json(&gemma3_1b()).unwrap();
        let global: Vec<usize> = (0..26).filter(|&i| !c.layer_is_sliding(i)).collect();
        assert_eq!(global, [5, 11, 17, 23]);
        assert_eq!(c.sliding_window, Some(512));
        assert_eq!((c.rope_theta, c.local_rope_theta), (1e6, Some(1e4)));
        assert_eq!(c.attention_scale(), 1.0 / 16.0);
        assert!(c.norm_unit_offset && c.scale_embeddings && c.sandwich_norms && c.qk_norm);
        assert_eq!(c.mlp_activation, MlpActivation::GeluTanh);
        assert_eq!(c.eos_token_ids, [1, 106]);
        // The local frequencies use the local base, unscaled.
        let local = c.local_inv_freq().unwrap();
        assert_eq!(local[1], (1.0 / 10_000f64.powf(2.0 / 256.0)) as f32);
        assert_eq!(c.inv_freq()[1], (1.0 / 1e6f64.powf(2.0 / 256.0)) as f32);
    }

    /// google/gemma-2-2b-it's config.json (transformers 4.42): no layer kinds written, so
    /// every other layer is global; soft-capping on; one RoPE base for all layers.
    #[test]
    fn gemma2_hub_config_alternates_layers_and_caps_its_logits() {
        let mut v = gemma3_1b();
        for (k, x) in [
            ("model_type", json!("gemma2")),
            ("architectures", json!(["Gemma2ForCausalLM"])),
            ("attn_logit_softcapping", json!(50.0)),
            ("final_logit_softcapping", json!(30.0)),
            ("hidden_size", json!(2304)),
            ("rope_theta", json!(10000.0)),
            ("sliding_window", json!(4096)),
        ] {
            v[k] = x;
        }
        for k in ["rope_local_base_freq", "sliding_window_pattern"] {
            v.as_object_mut().unwrap().remove(k);
        }
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.attn_logit_softcapping, Some(50.0));
        assert_eq!(c.final_logit_softcapping, Some(30.0));
        let sliding: Vec<bool> = (0..4).map(|i| c.layer_is_sliding(i)).collect();
        assert_eq!(sliding, [true, false, true, false]);
        assert_eq!(c.local_inv_freq(), None);
        assert!(!c.qk_norm && c.norm_unit_offset && c.sandwich_norms && c.scale_embeddings);
    }

    /// Keys a file leaves out take the config class's defaults (gemma2 caps at 50 / 30
    /// and slides over 4,096 positions); a null turns them off.
    #[test]
    fn absent_keys_take_transformers_defaults_and_null_turns_them_off() {
        let mut v = gemma3_1b();
        v["model_type"] = json!("gemma2");
        for k in [
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "sliding_window",
            "max_position_embeddings",
            "tie_word_embeddings",
        ] {
            v.as_object_mut().unwrap().remove(k);
        }
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        assert_eq!(
            (c.attn_logit_softcapping, c.final_logit_softcapping),
            (Some(50.0), Some(30.0))
        );
        assert_eq!(c.sliding_window, Some(4096));
        assert_eq!(c.max_position_embeddings, 8192);
        assert!(c.tie_word_embeddings);
        v["attn_logit_softcapping"] = json!(null);
        v["sliding_window"] = json!(null);
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.attn_logit_softcapping, None);
        assert!(!c.layer_is_sliding(0));
        // gemma3 caps nothing unless asked.
        v["model_type"] = json!("gemma3_text");
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        assert_eq!(c.final_logit_softcapping, None);
    }

    /// HuggingFaceTB/SmolLM3-3B's layout: every fourth layer without rotation, written
    /// out or left to `no_rope_layer_interval`.
    #[test]
    fn smollm3_reads_its_nope_layers() {
        let mut v = json!({
            "model_type": "smollm3", "vocab_size": 128256, "hidden_size": 2048,
            "intermediate_size": 11008, "num_hidden_layers": 8, "num_attention_heads": 16,
            "num_key_value_heads": 4, "rope_theta": 5000000.0, "use_sliding_window": false,
            "tie_word_embeddings": true
        });
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        let nope: Vec<usize> = (0..8).filter(|&i| !c.layer_rotates(i)).collect();
        assert_eq!(nope, [3, 7]);
        v["no_rope_layers"] = json!([1, 0, 1, 1, 1, 1, 1, 0]);
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        let nope: Vec<usize> = (0..8).filter(|&i| !c.layer_rotates(i)).collect();
        assert_eq!(nope, [1, 7]);
        v["no_rope_layers"] = json!([1, 0]);
        let e = DecoderConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(
            e.contains("no_rope_layers has 2 entries for 8 layers"),
            "{e}"
        );
        // A llama config rotates everywhere.
        v["model_type"] = json!("llama");
        assert!((0..8).all(|i| DecoderConfig::from_hf_json(&v).unwrap().layer_rotates(i)));
    }

    /// Gemma 3 4B's text tower scales its global rotation linearly by 8.
    #[test]
    fn linear_rope_scaling_divides_every_frequency() {
        let mut v = gemma3_1b();
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 8.0});
        let c = DecoderConfig::from_hf_json(&v).unwrap();
        let plain = DecoderConfig::from_hf_json(&gemma3_1b()).unwrap();
        for (s, p) in c.inv_freq().iter().zip(plain.inv_freq()) {
            assert_eq!(*s, ((p as f64) / 8.0) as f32);
        }
        assert_eq!(c.local_inv_freq(), plain.local_inv_freq());
    }

    #[test]
    fn options_not_built_are_refused_by_name() {
        for (key, value, needle) in [
            (
                "use_bidirectional_attention",
                json!(true),
                "use_bidirectional_attention",
            ),
            (
                "hidden_activation",
                json!("relu"),
                "hidden_activation \"relu\"",
            ),
            (
                "layer_types",
                json!(["sliding_attention"]),
                "layer_types has 1 entries",
            ),
            ("model_type", json!("gemma"), "model_type \"gemma\""),
        ] {
            let mut v = gemma3_1b();
            v[key] = value;
            let e = DecoderConfig::from_hf_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{key}: {e}");
        }
    }
}
