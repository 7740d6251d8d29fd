//! BERT-style encoders (bert, roberta) for sequence classification, built from
//! differentiable ops with transformers' module names, so adapters are PEFT's.
//!
//! The classification head is trained in full, as PEFT's `modules_to_save` does for
//! `task_type: SEQ_CLS`: BERT's `classifier` sits on the pooler (dense + tanh on the
//! first token), RoBERTa's `classifier.dense` / `classifier.out_proj` on the first
//! token directly. Losses follow transformers' `problem_type`s.

pub use crate::classes::{accuracy_macro_f1, classification_loss, ProblemType, Targets};
use crate::io::get_usize;
use crate::io::{Take, Weights};
use crate::lora::{dropout, ForwardCtx, Linear, LoraModel};
use crate::nn::{FullLinear, LayerNorm};
use crate::ops::{fast_path, masked_softmax, multi_head_attention, AttnMask, Heads, MASKED};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// Architectures with an encoder port.
pub const ENCODER_ARCHITECTURES: [&str; 2] = ["bert", "roberta"];

/// Padded keys get this score; large but finite so a sum never turns into NaN.

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EncoderKind {
    Bert,
    Roberta,
}

impl EncoderKind {
    /// The attribute transformers' `*ForSequenceClassification` keeps the encoder under.
    pub fn prefix(&self) -> &'static str {
        match self {
            EncoderKind::Bert => "bert",
            EncoderKind::Roberta => "roberta",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Activation {
    /// transformers' `gelu`: the exact, erf-based GELU.
    GeluErf,
    /// `gelu_new` / `gelu_pytorch_tanh`.
    GeluTanh,
    Relu,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderConfig {
    pub kind: EncoderKind,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub activation: Activation,
    pub layer_norm_eps: f64,
    pub max_position_embeddings: usize,
    pub type_vocab_size: usize,
    pub pad_token_id: u32,
    pub hidden_dropout: f32,
    pub attention_dropout: f32,
    pub classifier_dropout: f32,
    pub initializer_range: f64,
}

fn get_f64(v: &Value, key: &str, default: f64) -> f64 {
    v.get(key).and_then(|x| x.as_f64()).unwrap_or(default)
}

impl EncoderConfig {
    /// Parses a HF `config.json` of a bert or roberta model. Options the port does not
    /// implement are an error that names them.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        let kind = match model_type {
            "bert" => EncoderKind::Bert,
            "roberta" => EncoderKind::Roberta,
            other => {
                return Err(Error::Unsupported(format!(
                    "encoder model_type \"{other}\" (supported: {})",
                    ENCODER_ARCHITECTURES.join(", ")
                )))
            }
        };
        if let Some(p) = v.get("position_embedding_type").and_then(|x| x.as_str()) {
            if p != "absolute" {
                return Err(Error::Unsupported(format!(
                    "config.json: position_embedding_type \"{p}\" (only \"absolute\")"
                )));
            }
        }
        if v.get("is_decoder").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::Unsupported("config.json: is_decoder true".into()));
        }
        let act = v
            .get("hidden_act")
            .and_then(|x| x.as_str())
            .unwrap_or("gelu");
        let activation = match act {
            "gelu" => Activation::GeluErf,
            "gelu_new" | "gelu_pytorch_tanh" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            other => {
                return Err(Error::Unsupported(format!(
                    "config.json: hidden_act \"{other}\""
                )))
            }
        };
        let hidden_size = get_usize(v, "hidden_size")?;
        let heads = get_usize(v, "num_attention_heads")?;
        if heads == 0 || hidden_size % heads != 0 {
            return Err(Error::Config(format!(
                "config.json: hidden_size {hidden_size} is not a multiple of num_attention_heads {heads}"
            )));
        }
        let hidden_dropout = get_f64(v, "hidden_dropout_prob", 0.1) as f32;
        Ok(Self {
            kind,
            vocab_size: get_usize(v, "vocab_size")?,
            hidden_size,
            num_hidden_layers: get_usize(v, "num_hidden_layers")?,
            num_attention_heads: heads,
            intermediate_size: get_usize(v, "intermediate_size")?,
            activation,
            layer_norm_eps: get_f64(v, "layer_norm_eps", 1e-12),
            max_position_embeddings: get_usize(v, "max_position_embeddings")?,
            type_vocab_size: v
                .get("type_vocab_size")
                .and_then(|x| x.as_u64())
                .unwrap_or(2) as usize,
            pad_token_id: v
                .get("pad_token_id")
                .and_then(|x| x.as_u64())
                .unwrap_or(match kind {
                    EncoderKind::Bert => 0,
                    EncoderKind::Roberta => 1,
                }) as u32,
            hidden_dropout,
            attention_dropout: get_f64(v, "attention_probs_dropout_prob", 0.1) as f32,
            classifier_dropout: v
                .get("classifier_dropout")
                .and_then(|x| x.as_f64())
                .map(|x| x as f32)
                .unwrap_or(hidden_dropout),
            initializer_range: get_f64(v, "initializer_range", 0.02),
        })
    }

    /// Positions a sequence may use (RoBERTa's start after the padding index).
    pub fn max_tokens(&self) -> usize {
        match self.kind {
            EncoderKind::Bert => self.max_position_embeddings,
            EncoderKind::Roberta => self
                .max_position_embeddings
                .saturating_sub(self.pad_token_id as usize + 1),
        }
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attn_out: Linear,
    attn_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    out_norm: LayerNorm,
}

enum Head {
    Bert {
        classifier: FullLinear,
    },
    Roberta {
        dense: FullLinear,
        out_proj: FullLinear,
    },
}

/// A padded batch for the encoder.
pub struct EncoderBatch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    pub position_ids: Tensor,
    pub attention_mask: Vec<Vec<u32>>,
    /// Real (not padding) tokens.
    pub tokens: usize,
}

/// One tokenized example.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedText {
    pub input_ids: Vec<u32>,
    pub token_type_ids: Vec<u32>,
}

pub struct Encoder {
    pub cfg: EncoderConfig,
    pub num_labels: usize,
    word: Tensor,
    position: Tensor,
    token_type: Option<Tensor>,
    emb_norm: LayerNorm,
    layers: Vec<Layer>,
    pooler: Option<Linear>,
    head: Head,
    /// Whether the model's own dropout (hidden, attention, classifier) applies in training.
    pub model_dropout: bool,
    device: Device,
}

fn normal(n: usize, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    // Box-Muller: two uniforms give a standard normal.
    (0..n)
        .map(|_| {
            let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            let u2: f64 = rng.random();
            ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos() * std) as f32
        })
        .collect()
}

impl Encoder {
    /// Builds the model from HF-named f32 weights, with or without the task prefix
    /// (`bert.` / `roberta.`): a bare `BertModel` checkpoint like all-MiniLM-L6-v2 loads
    /// as the encoder of a classifier whose head is new. A head in the checkpoint with
    /// `num_labels` outputs is used; otherwise it starts as transformers initialises it
    /// (normal(0, initializer_range) weights, zero bias), from `seed`.
    pub fn new(
        cfg: EncoderConfig,
        mut w: Weights,
        num_labels: usize,
        seed: u64,
        device: &Device,
    ) -> Result<Self> {
        if num_labels == 0 {
            return Err(Error::Config("num_labels must be at least 1".into()));
        }
        let prefix = cfg.kind.prefix();
        // The base model's weights sit under `bert.` / `roberta.` in a classifier's
        // checkpoint and at the top level in a bare encoder's.
        let has_prefix = w.keys().any(|k| k.starts_with(&format!("{prefix}.")));
        let (word, position, token_type, emb_norm, layers, pooler) = {
            let mut t = Take::new(&mut w, "encoder");
            if has_prefix {
                t = t.with_prefix(prefix);
            }
            let linear = |t: &mut Take, name: &str| -> Result<Linear> {
                let weight = t.get(&format!("{name}.weight"))?;
                let bias = t.get(&format!("{name}.bias"))?;
                Ok(Linear::new(format!("{prefix}.{name}"), weight, Some(bias)))
            };
            let norm = |t: &mut Take, name: &str| -> Result<LayerNorm> {
                Ok(LayerNorm {
                    weight: t.get(&format!("{name}.weight"))?,
                    bias: t.get(&format!("{name}.bias"))?,
                    eps: cfg.layer_norm_eps,
                })
            };
            let t = &mut t;
            let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
            for i in 0..cfg.num_hidden_layers {
                let p = format!("encoder.layer.{i}");
                layers.push(Layer {
                    query: linear(t, &format!("{p}.attention.self.query"))?,
                    key: linear(t, &format!("{p}.attention.self.key"))?,
                    value: linear(t, &format!("{p}.attention.self.value"))?,
                    attn_out: linear(t, &format!("{p}.attention.output.dense"))?,
                    attn_norm: norm(t, &format!("{p}.attention.output.LayerNorm"))?,
                    intermediate: linear(t, &format!("{p}.intermediate.dense"))?,
                    output: linear(t, &format!("{p}.output.dense"))?,
                    out_norm: norm(t, &format!("{p}.output.LayerNorm"))?,
                });
            }
            let word = t.get("embeddings.word_embeddings.weight")?;
            if word.dims() != [cfg.vocab_size, cfg.hidden_size] {
                return Err(Error::Model(format!(
                    "word_embeddings has shape {:?}, config says ({}, {})",
                    word.dims(),
                    cfg.vocab_size,
                    cfg.hidden_size
                )));
            }
            let position = t.get("embeddings.position_embeddings.weight")?;
            let token_type = t.get_opt("embeddings.token_type_embeddings.weight");
            let emb_norm = norm(t, "embeddings.LayerNorm")?;
            let pooler = match cfg.kind {
                EncoderKind::Bert => Some(linear(t, "pooler.dense")?),
                EncoderKind::Roberta => None,
            };
            (word, position, token_type, emb_norm, layers, pooler)
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xC1A5_51F1_E400_0000);
        let h = cfg.hidden_size;
        let mut full =
            |w: &mut Weights, path: &str, out: usize, inp: usize| -> Result<FullLinear> {
                let (wk, bk) = (format!("{path}.weight"), format!("{path}.bias"));
                let weight = match (w.remove(&wk), w.remove(&bk)) {
                    (Some(wt), Some(bt)) if wt.dims() == [out, inp] && bt.dims() == [out] => {
                        (wt, bt)
                    }
                    _ => (
                        Tensor::from_vec(
                            normal(out * inp, cfg.initializer_range, &mut rng),
                            (out, inp),
                            device,
                        )?,
                        Tensor::zeros(out, DType::F32, device)?,
                    ),
                };
                Ok(FullLinear {
                    path: path.to_string(),
                    weight: Var::from_tensor(&weight.0)?,
                    bias: Var::from_tensor(&weight.1)?,
                })
            };
        let head = match cfg.kind {
            EncoderKind::Bert => Head::Bert {
                classifier: full(&mut w, "classifier", num_labels, h)?,
            },
            EncoderKind::Roberta => Head::Roberta {
                dense: full(&mut w, "classifier.dense", h, h)?,
                out_proj: full(&mut w, "classifier.out_proj", num_labels, h)?,
            },
        };
        Ok(Self {
            cfg,
            num_labels,
            word,
            position,
            token_type,
            emb_norm,
            layers,
            pooler,
            head,
            model_dropout: true,
            device: device.clone(),
        })
    }

    /// Loads `config.json` + safetensors from an HF folder.
    pub fn load(dir: &Path, num_labels: usize, seed: u64, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = EncoderConfig::from_hf_json(&crate::io::read_json(&cfg_path)?)?;
        let weights = crate::io::read_safetensors_f32(dir, device)?;
        Self::new(cfg, weights, num_labels, seed, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    fn drop(&self, x: &Tensor, p: f32, ctx: &ForwardCtx) -> Result<Tensor> {
        if ctx.train && self.model_dropout && p > 0.0 {
            dropout(x, p, &mut ctx.rng.borrow_mut())
        } else {
            Ok(x.clone())
        }
    }

    /// Right-pads tokenized examples into a batch with transformers' position ids.
    pub fn batch(&self, examples: &[&EncodedText]) -> Result<EncoderBatch> {
        let t = examples
            .iter()
            .map(|e| e.input_ids.len())
            .max()
            .unwrap_or(1)
            .max(1);
        if t > self.cfg.max_tokens() {
            return Err(Error::Data(format!(
                "a sequence of {t} tokens exceeds the model's {} positions",
                self.cfg.max_tokens()
            )));
        }
        let pad = self.cfg.pad_token_id;
        let (mut ids, mut types, mut pos, mut mask) = (vec![], vec![], vec![], vec![]);
        let mut tokens = 0;
        for e in examples {
            let n = e.input_ids.len();
            tokens += n;
            ids.extend(&e.input_ids);
            ids.extend(std::iter::repeat_n(pad, t - n));
            types.extend(e.token_type_ids.iter().take(n));
            types.extend(std::iter::repeat_n(0, t - e.token_type_ids.len().min(n)));
            for i in 0..t {
                pos.push(match self.cfg.kind {
                    EncoderKind::Bert => i as u32,
                    // RoBERTa counts real tokens from padding_idx + 1; padding sits at padding_idx.
                    EncoderKind::Roberta if i < n => pad + 1 + i as u32,
                    EncoderKind::Roberta => pad,
                });
            }
            mask.push((0..t).map(|i| u32::from(i < n)).collect());
        }
        let b = examples.len();
        Ok(EncoderBatch {
            input_ids: Tensor::from_vec(ids, (b, t), &self.device)?,
            token_type_ids: Tensor::from_vec(types, (b, t), &self.device)?,
            position_ids: Tensor::from_vec(pos, (b, t), &self.device)?,
            attention_mask: mask,
            tokens,
        })
    }

    /// Classification logits `(b, num_labels)`.
    pub fn logits(&self, batch: &EncoderBatch, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, t) = batch.input_ids.dims2()?;
        let d = self.cfg.hidden_size;
        let flat = |x: &Tensor| x.flatten_all();
        let mut x = self.word.index_select(&flat(&batch.input_ids)?, 0)?;
        x = (x + self.position.index_select(&flat(&batch.position_ids)?, 0)?)?;
        if let Some(tt) = &self.token_type {
            x = (x + tt.index_select(&flat(&batch.token_type_ids)?, 0)?)?;
        }
        let x = self.emb_norm.forward(&x)?;
        let mut x = self.drop(&x, self.cfg.hidden_dropout, ctx)?;
        let mut m = vec![0f32; b * t * t];
        for (bi, row) in batch.attention_mask.iter().enumerate() {
            for i in 0..t {
                for (j, &keep) in row.iter().enumerate() {
                    if keep == 0 {
                        m[(bi * t + i) * t + j] = MASKED;
                    }
                }
            }
        }
        // The head reads each sequence's first row of the last layer, and every row of a
        // layer is computed from its own row of the layer below but for attention's keys
        // and values: the last layer needs queries, and everything after attention, on
        // those `b` rows only (a sixth of MiniLM's products at 128 tokens). Dropout on the
        // probabilities keeps the composed path, which takes every row.
        let first: Vec<u32> = (0..b).map(|i| (i * t) as u32).collect();
        let first = Tensor::from_vec(first, b, &self.device)?;
        let probs_dropped = ctx.train && self.model_dropout && self.cfg.attention_dropout > 0.0;
        let last_rows_only = !(self.layers.is_empty() || probs_dropped) && fast_path(&x);
        // Each sequence's first query row of the mask, for the last layer's `b` queries.
        let mask_first = match last_rows_only {
            true => {
                let firsts = m.chunks(t * t).flat_map(|r| r[..t].to_vec()).collect();
                Some(AttnMask::new(firsts, b, 1, t, &self.device)?)
            }
            false => None,
        };
        let mask = AttnMask::new(m, b, t, t, &self.device)?;
        let last = self.layers.len().saturating_sub(1);
        for (li, l) in self.layers.iter().enumerate() {
            let (a, res) = match &mask_first {
                Some(mask_first) if li == last => {
                    let xq = x.index_select(&first, 0)?;
                    (self.attention(l, &xq, &x, (b, 1, t), mask_first, ctx)?, xq)
                }
                _ => (self.attention(l, &x, &x, (b, t, t), &mask, ctx)?, x),
            };
            let a = self.drop(&l.attn_out.forward(&a, ctx)?, self.cfg.hidden_dropout, ctx)?;
            x = l.attn_norm.forward_residual(&a, &res)?;
            let h = l.intermediate.forward(&x, ctx)?;
            let h = match self.cfg.activation {
                Activation::GeluErf => l.output.forward_gelu_input(&h, ctx)?,
                Activation::GeluTanh => l.output.forward(&h.gelu()?, ctx)?,
                Activation::Relu => l.output.forward(&h.relu()?, ctx)?,
            };
            let h = self.drop(&h, self.cfg.hidden_dropout, ctx)?;
            x = l.out_norm.forward_residual(&h, &x)?;
        }
        // The first token of each sequence: [CLS] / <s>.
        let cls = if last_rows_only {
            x
        } else {
            x.index_select(&first, 0)?
        };
        debug_assert_eq!(cls.dims(), [b, d]);
        let p = self.cfg.classifier_dropout;
        match &self.head {
            Head::Bert { classifier } => {
                let pooler = self.pooler.as_ref().expect("bert has a pooler");
                let pooled = pooler.forward(&cls, ctx)?.tanh()?;
                classifier.forward(&self.drop(&pooled, p, ctx)?)
            }
            Head::Roberta { dense, out_proj } => {
                let h = dense.forward(&self.drop(&cls, p, ctx)?)?.tanh()?;
                out_proj.forward(&self.drop(&h, p, ctx)?)
            }
        }
    }

    /// Self-attention of the `(b·tq, d)` query rows `xq` over the `(b·t, d)` rows `x`
    /// (`xq` is `x` itself, or each sequence's first row in the last layer).
    fn attention(
        &self,
        l: &Layer,
        xq: &Tensor,
        x: &Tensor,
        (b, tq, t): (usize, usize, usize),
        mask: &AttnMask,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let nh = self.cfg.num_attention_heads;
        let hd = self.cfg.hidden_size / nh;
        let scale = 1.0 / (hd as f64).sqrt();
        let dropped = ctx.train && self.model_dropout && self.cfg.attention_dropout > 0.0;
        if !dropped && fast_path(x) {
            // One op that keeps q, k and v only; dropout on the probabilities would need
            // them kept, so that case stays composed.
            let g = Heads {
                b,
                t: tq,
                tk: t,
                q: nh,
                kv: nh,
                dim: hd,
            };
            let (q, k, v) = (
                l.query.forward(xq, ctx)?,
                l.key.forward(x, ctx)?,
                l.value.forward(x, ctx)?,
            );
            return Ok(multi_head_attention(
                &q,
                &k,
                &v,
                g,
                scale,
                None,
                Some(mask),
            )?);
        }
        let heads = |y: Tensor, t: usize| -> Result<Tensor> {
            Ok(y.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let q = heads(l.query.forward(xq, ctx)?, tq)?;
        let k = heads(l.key.forward(x, ctx)?, t)?;
        let v = heads(l.value.forward(x, ctx)?, t)?;
        let scores = q.matmul(&k.t()?)?;
        let p = masked_softmax(&scores, scale, mask)?;
        let p = self.drop(&p, self.cfg.attention_dropout, ctx)?;
        Ok(p.matmul(&v)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * tq, nh * hd))?)
    }

    fn head_layers(&self) -> Vec<&FullLinear> {
        match &self.head {
            Head::Bert { classifier } => vec![classifier],
            Head::Roberta { dense, out_proj } => vec![dense, out_proj],
        }
    }
}

impl LoraModel for Encoder {
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        let mut out: Vec<(&mut Linear, bool)> = Vec::new();
        for l in self.layers.iter_mut() {
            for lin in [
                &mut l.query,
                &mut l.key,
                &mut l.value,
                &mut l.attn_out,
                &mut l.intermediate,
                &mut l.output,
            ] {
                out.push((lin, false));
            }
        }
        if let Some(p) = self.pooler.as_mut() {
            out.push((p, false));
        }
        out
    }
    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::new();
        for l in &self.layers {
            out.extend([
                &l.query,
                &l.key,
                &l.value,
                &l.attn_out,
                &l.intermediate,
                &l.output,
            ]);
        }
        out.extend(self.pooler.as_ref());
        out
    }
    fn task_type(&self) -> &'static str {
        "SEQ_CLS"
    }
    fn full_params(&self) -> Vec<(String, Var)> {
        self.head_layers().iter().flat_map(|h| h.params()).collect()
    }
    fn modules_to_save(&self) -> Vec<String> {
        // What PEFT records for SEQ_CLS: the names it looks for, whichever exists.
        vec!["classifier".into(), "score".into()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsupported_options_are_named() {
        let v = serde_json::json!({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
            "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 16,
            "max_position_embeddings": 16, "position_embedding_type": "relative_key"});
        let e = EncoderConfig::from_hf_json(&v).unwrap_err().to_string();
        assert!(e.contains("position_embedding_type"), "{e}");
        let v = serde_json::json!({"model_type": "bert", "hidden_size": 8, "num_attention_heads": 2,
            "vocab_size": 10, "num_hidden_layers": 1, "intermediate_size": 16,
            "max_position_embeddings": 16, "hidden_act": "swish"});
        assert!(EncoderConfig::from_hf_json(&v)
            .unwrap_err()
            .to_string()
            .contains("swish"));
    }
}
