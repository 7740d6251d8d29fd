//! transformers' `WhisperForConditionalGeneration`, built from differentiable ops with its
//! module names, so that adapters are PEFT's: the encoder (two 1-D convolutions with GELU,
//! learned positions, pre-norm self-attention layers) and the decoder (token and position
//! embeddings, causal self-attention, cross-attention on the encoder's states, the output
//! projection tied to the token embeddings). Every attention and MLP projection is a
//! [`Linear`] that can carry LoRA; the convolutions, embeddings and norms stay frozen.
//! Dropout is not applied (a fine-tuning recipe's Whisper runs with 0).

use crate::io::{get_usize, Take, Weights};
use crate::lora::{ForwardCtx, Linear, LoraModel};
use crate::nn::LayerNorm;
use crate::ops::{
    cross_entropy_rows, fast_path, masked_softmax, multi_head_attention, softmax_last, AttnMask,
    Heads, MASKED,
};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// Architectures with a port here (`model_type`).
pub const ARCHITECTURES: [&str; 1] = ["whisper"];

/// `nn.LayerNorm`'s default.
const LN_EPS: f64 = 1e-5;

#[derive(Debug, Clone, PartialEq)]
pub struct WhisperConfig {
    pub vocab_size: usize,
    pub num_mel_bins: usize,
    pub d_model: usize,
    pub encoder_layers: usize,
    pub decoder_layers: usize,
    pub encoder_heads: usize,
    pub decoder_heads: usize,
    pub encoder_ffn_dim: usize,
    pub decoder_ffn_dim: usize,
    pub max_source_positions: usize,
    pub max_target_positions: usize,
}

impl WhisperConfig {
    /// Parses a HF `config.json` of a whisper model; what the port does not implement
    /// is an error naming it.
    pub fn from_hf_json(v: &Value) -> Result<Self> {
        let model_type = v.get("model_type").and_then(|x| x.as_str()).unwrap_or("");
        if model_type != "whisper" {
            return Err(Error::Unsupported(format!(
                "speech model_type \"{model_type}\" (supported: whisper)"
            )));
        }
        let act = v
            .get("activation_function")
            .and_then(|x| x.as_str())
            .unwrap_or("gelu");
        if act != "gelu" {
            return Err(Error::Unsupported(format!(
                "config.json: activation_function \"{act}\" (only gelu)"
            )));
        }
        if v.get("scale_embedding").and_then(|x| x.as_bool()) == Some(true) {
            return Err(Error::Unsupported(
                "config.json: scale_embedding true".into(),
            ));
        }
        let cfg = Self {
            vocab_size: get_usize(v, "vocab_size")?,
            num_mel_bins: get_usize(v, "num_mel_bins")?,
            d_model: get_usize(v, "d_model")?,
            encoder_layers: get_usize(v, "encoder_layers")?,
            decoder_layers: get_usize(v, "decoder_layers")?,
            encoder_heads: get_usize(v, "encoder_attention_heads")?,
            decoder_heads: get_usize(v, "decoder_attention_heads")?,
            encoder_ffn_dim: get_usize(v, "encoder_ffn_dim")?,
            decoder_ffn_dim: get_usize(v, "decoder_ffn_dim")?,
            max_source_positions: get_usize(v, "max_source_positions")?,
            max_target_positions: get_usize(v, "max_target_positions")?,
        };
        for h in [cfg.encoder_heads, cfg.decoder_heads] {
            if h == 0 || !cfg.d_model.is_multiple_of(h) {
                return Err(Error::Config(format!(
                    "config.json: d_model {} is not a multiple of {h} heads",
                    cfg.d_model
                )));
            }
        }
        Ok(cfg)
    }

    /// The paths of the modules LoRA can go on (every attention and MLP projection),
    /// as transformers names them.
    pub fn linear_paths(&self) -> Vec<String> {
        let mut out = Vec::new();
        for i in 0..self.encoder_layers {
            let p = format!("model.encoder.layers.{i}");
            for a in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                out.push(format!("{p}.self_attn.{a}"));
            }
            out.extend([format!("{p}.fc1"), format!("{p}.fc2")]);
        }
        for i in 0..self.decoder_layers {
            let p = format!("model.decoder.layers.{i}");
            for attn in ["self_attn", "encoder_attn"] {
                for a in ["q_proj", "k_proj", "v_proj", "out_proj"] {
                    out.push(format!("{p}.{attn}.{a}"));
                }
            }
            out.extend([format!("{p}.fc1"), format!("{p}.fc2")]);
        }
        out
    }

    /// The mel frames the encoder reads: two per source position (the second
    /// convolution has stride 2).
    pub fn input_frames(&self) -> usize {
        2 * self.max_source_positions
    }
}

/// One attention block's projections (`k_proj` has no bias in Whisper).
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    heads: usize,
}

struct EncoderLayer {
    attn_norm: LayerNorm,
    attn: Attention,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

struct DecoderLayer {
    self_norm: LayerNorm,
    self_attn: Attention,
    cross_norm: LayerNorm,
    cross_attn: Attention,
    ffn_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

pub struct Whisper {
    pub cfg: WhisperConfig,
    conv1: (Tensor, Tensor),
    conv2: (Tensor, Tensor),
    encoder_positions: Tensor,
    encoder: Vec<EncoderLayer>,
    encoder_norm: LayerNorm,
    embed_tokens: Tensor,
    decoder_positions: Tensor,
    decoder: Vec<DecoderLayer>,
    decoder_norm: LayerNorm,
    device: Device,
}

/// `softmax(q·kᵀ·scale + mask)·v` over `heads` heads of `(b·t, d)` queries and `(b·tk, d)`
/// keys and values: the fused op on the CPU in f32, candle's ops elsewhere.
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    (b, t, tk): (usize, usize, usize),
    heads: usize,
    mask: Option<&AttnMask>,
) -> Result<Tensor> {
    let d = q.dim(1)?;
    let dim = d / heads;
    let scale = 1.0 / (dim as f64).sqrt();
    if fast_path(q) {
        let g = Heads {
            b,
            t,
            tk,
            q: heads,
            kv: heads,
            dim,
        };
        return Ok(multi_head_attention(q, k, v, g, scale, None, mask)?);
    }
    let split = |y: &Tensor, len: usize| -> Result<Tensor> {
        Ok(y.reshape((b, len, heads, dim))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(q, t)?, split(k, tk)?, split(v, tk)?);
    let scores = q.matmul(&k.t()?)?;
    let p = match mask {
        Some(m) => masked_softmax(&scores, scale, m)?,
        None => softmax_last(&(scores * scale)?)?,
    };
    Ok(p.matmul(&v)?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((b * t, d))?)
}

impl Whisper {
    /// Builds the model from HF-named f32 weights.
    pub fn new(cfg: WhisperConfig, mut w: Weights, device: &Device) -> Result<Self> {
        let mut t = Take::new(&mut w, "whisper");
        let t = &mut t;
        let linear = |t: &mut Take, path: &str, bias: bool| -> Result<Linear> {
            let weight = t.get(&format!("{path}.weight"))?;
            let b = if bias {
                Some(t.get(&format!("{path}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(path.to_string(), weight, b))
        };
        let norm = |t: &mut Take, path: &str| -> Result<LayerNorm> {
            Ok(LayerNorm {
                weight: t.get(&format!("{path}.weight"))?,
                bias: t.get(&format!("{path}.bias"))?,
                eps: LN_EPS,
            })
        };
        let attention = |t: &mut Take, p: &str, heads: usize| -> Result<Attention> {
            Ok(Attention {
                q: linear(t, &format!("{p}.q_proj"), true)?,
                k: linear(t, &format!("{p}.k_proj"), false)?,
                v: linear(t, &format!("{p}.v_proj"), true)?,
                out: linear(t, &format!("{p}.out_proj"), true)?,
                heads,
            })
        };
        let conv = |t: &mut Take, p: &str| -> Result<(Tensor, Tensor)> {
            Ok((t.get(&format!("{p}.weight"))?, t.get(&format!("{p}.bias"))?))
        };
        let conv1 = conv(t, "model.encoder.conv1")?;
        let conv2 = conv(t, "model.encoder.conv2")?;
        if conv1.0.dims() != [cfg.d_model, cfg.num_mel_bins, 3] {
            return Err(Error::Model(format!(
                "model.encoder.conv1.weight has shape {:?}, the config says [{}, {}, 3]",
                conv1.0.dims(),
                cfg.d_model,
                cfg.num_mel_bins
            )));
        }
        let encoder_positions = t.get("model.encoder.embed_positions.weight")?;
        let encoder = (0..cfg.encoder_layers)
            .map(|i| {
                let p = format!("model.encoder.layers.{i}");
                Ok(EncoderLayer {
                    attn_norm: norm(t, &format!("{p}.self_attn_layer_norm"))?,
                    attn: attention(t, &format!("{p}.self_attn"), cfg.encoder_heads)?,
                    ffn_norm: norm(t, &format!("{p}.final_layer_norm"))?,
                    fc1: linear(t, &format!("{p}.fc1"), true)?,
                    fc2: linear(t, &format!("{p}.fc2"), true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let encoder_norm = norm(t, "model.encoder.layer_norm")?;
        let embed_tokens = t.get("model.decoder.embed_tokens.weight")?;
        if embed_tokens.dims() != [cfg.vocab_size, cfg.d_model] {
            return Err(Error::Model(format!(
                "embed_tokens has shape {:?}, the config says [{}, {}]",
                embed_tokens.dims(),
                cfg.vocab_size,
                cfg.d_model
            )));
        }
        let decoder_positions = t.get("model.decoder.embed_positions.weight")?;
        let decoder = (0..cfg.decoder_layers)
            .map(|i| {
                let p = format!("model.decoder.layers.{i}");
                Ok(DecoderLayer {
                    self_norm: norm(t, &format!("{p}.self_attn_layer_norm"))?,
                    self_attn: attention(t, &format!("{p}.self_attn"), cfg.decoder_heads)?,
                    cross_norm: norm(t, &format!("{p}.encoder_attn_layer_norm"))?,
                    cross_attn: attention(t, &format!("{p}.encoder_attn"), cfg.decoder_heads)?,
                    ffn_norm: norm(t, &format!("{p}.final_layer_norm"))?,
                    fc1: linear(t, &format!("{p}.fc1"), true)?,
                    fc2: linear(t, &format!("{p}.fc2"), true)?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let decoder_norm = norm(t, "model.decoder.layer_norm")?;
        Ok(Self {
            cfg,
            conv1,
            conv2,
            encoder_positions,
            encoder,
            encoder_norm,
            embed_tokens,
            decoder_positions,
            decoder,
            decoder_norm,
            device: device.clone(),
        })
    }

    /// Loads `config.json` + safetensors from an HF folder.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg = WhisperConfig::from_hf_json(&crate::io::read_json(&dir.join("config.json"))?)?;
        let weights = crate::io::read_safetensors_f32(dir, device)?;
        Self::new(cfg, weights, device)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The encoder's states `(b·positions, d)` for `(b, mel bins, 2·positions)` features.
    pub fn encode(&self, features: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, bins, frames) = features.dims3()?;
        if bins != self.cfg.num_mel_bins || frames != self.cfg.input_frames() {
            return Err(Error::Data(format!(
                "features of {bins} mel bins x {frames} frames; the model reads {} x {}",
                self.cfg.num_mel_bins,
                self.cfg.input_frames()
            )));
        }
        // The front end is frozen and nothing before it trains: no graph to keep.
        let conv = |x: &Tensor, (w, bias): &(Tensor, Tensor), stride| -> Result<Tensor> {
            let y = x.conv1d(w, 1, stride, 1, 1)?;
            let y = y.broadcast_add(&bias.reshape((1, bias.elem_count(), 1))?)?;
            Ok(crate::ops::gelu_erf(&y)?)
        };
        let x = conv(&conv(features, &self.conv1, 1)?, &self.conv2, 2)?;
        let s = self.cfg.max_source_positions;
        let d = self.cfg.d_model;
        let x = x.transpose(1, 2)?.broadcast_add(&self.encoder_positions)?;
        let mut x = x.reshape((b * s, d))?;
        for l in &self.encoder {
            let h = l.attn_norm.forward(&x)?;
            let a = self.attention(&l.attn, &h, &h, (b, s, s), None, ctx)?;
            x = (x + a)?;
            let h = l.ffn_norm.forward(&x)?;
            let h = crate::ops::gelu_erf(&l.fc1.forward(&h, ctx)?)?;
            x = (x + l.fc2.forward(&h, ctx)?)?;
        }
        self.encoder_norm.forward(&x)
    }

    fn attention(
        &self,
        a: &Attention,
        x: &Tensor,
        kv: &Tensor,
        shape: (usize, usize, usize),
        mask: Option<&AttnMask>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let q = a.q.forward(x, ctx)?;
        let k = a.k.forward(kv, ctx)?;
        let v = a.v.forward(kv, ctx)?;
        let o = attend(&q, &k, &v, shape, a.heads, mask)?;
        a.out.forward(&o, ctx)
    }

    /// Decoder logits `(b·t, vocab)` for `(b, t)` token ids on the encoder's `states`.
    pub fn decode(&self, states: &Tensor, ids: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        self.decode_with(states, ids, None, false, ctx)
    }

    /// Every decoder layer's cross-attention keys and values of the encoder's `states`:
    /// greedy decoding computes them once per clip rather than once per token.
    pub fn cross_kv(&self, states: &Tensor, ctx: &ForwardCtx) -> Result<Vec<(Tensor, Tensor)>> {
        self.decoder
            .iter()
            .map(|l| {
                Ok((
                    l.cross_attn.k.forward(states, ctx)?,
                    l.cross_attn.v.forward(states, ctx)?,
                ))
            })
            .collect()
    }

    /// [`Self::decode`] with the cross-attention keys and values given ([`Self::cross_kv`])
    /// or computed, and the logits of every position or (`last_only`) of each row's last.
    pub fn decode_with(
        &self,
        states: &Tensor,
        ids: &Tensor,
        cross: Option<&[(Tensor, Tensor)]>,
        last_only: bool,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let s = states.dim(0)? / b;
        if t > self.cfg.max_target_positions {
            return Err(Error::Data(format!(
                "{t} decoder tokens exceed the model's {} positions",
                self.cfg.max_target_positions
            )));
        }
        let d = self.cfg.d_model;
        let x = self
            .embed_tokens
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, t, d))?
            .broadcast_add(&self.decoder_positions.narrow(0, 0, t)?)?;
        let mut x = x.reshape((b * t, d))?;
        let mut causal = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in i + 1..t {
                    causal[(bi * t + i) * t + j] = MASKED;
                }
            }
        }
        let causal = AttnMask::new(causal, b, t, t, &self.device)?;
        for (i, l) in self.decoder.iter().enumerate() {
            let h = l.self_norm.forward(&x)?;
            x = (&x + self.attention(&l.self_attn, &h, &h, (b, t, t), Some(&causal), ctx)?)?;
            let h = l.cross_norm.forward(&x)?;
            let a = &l.cross_attn;
            let o = match cross.and_then(|c| c.get(i)) {
                Some((k, v)) => {
                    let q = a.q.forward(&h, ctx)?;
                    a.out
                        .forward(&attend(&q, k, v, (b, t, s), a.heads, None)?, ctx)?
                }
                None => self.attention(a, &h, states, (b, t, s), None, ctx)?,
            };
            x = (&x + o)?;
            let h = l.ffn_norm.forward(&x)?;
            let h = crate::ops::gelu_erf(&l.fc1.forward(&h, ctx)?)?;
            x = (x + l.fc2.forward(&h, ctx)?)?;
        }
        if last_only {
            x = x.reshape((b, t, d))?.narrow(1, t - 1, 1)?.reshape((b, d))?;
        }
        let x = self.decoder_norm.forward(&x)?;
        Ok(x.matmul(&self.embed_tokens.t()?)?)
    }

    /// The cross entropy summed over the labels that are not -100, and their count.
    pub fn loss_sum(
        &self,
        features: &Tensor,
        decoder_ids: &Tensor,
        labels: &[i64],
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, usize)> {
        let states = self.encode(features, ctx)?;
        let (kept, targets) = self.scored_logits(&states, decoder_ids, labels, ctx)?;
        Ok((
            cross_entropy_rows(&kept, &targets)?.sum_all()?,
            targets.len(),
        ))
    }

    /// The decoder's logits of the rows a label scores (`labels` of -100 are not), and
    /// those labels: what the loss and the token accuracy are taken over.
    pub fn scored_logits(
        &self,
        states: &Tensor,
        decoder_ids: &Tensor,
        labels: &[i64],
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Vec<u32>)> {
        let logits = self.decode(states, decoder_ids, ctx)?;
        let rows: Vec<u32> = (0..labels.len() as u32)
            .filter(|&i| labels[i as usize] >= 0)
            .collect();
        let targets: Vec<u32> = rows.iter().map(|&i| labels[i as usize] as u32).collect();
        let n = rows.len();
        let kept = logits.index_select(&Tensor::from_vec(rows, n, &self.device)?, 0)?;
        Ok((kept, targets))
    }
}

impl LoraModel for Whisper {
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        let mut out: Vec<(&mut Linear, bool)> = Vec::new();
        for l in self.encoder.iter_mut() {
            let a = &mut l.attn;
            for lin in [
                &mut a.q, &mut a.k, &mut a.v, &mut a.out, &mut l.fc1, &mut l.fc2,
            ] {
                out.push((lin, false));
            }
        }
        for l in self.decoder.iter_mut() {
            let (s, c) = (&mut l.self_attn, &mut l.cross_attn);
            for lin in [
                &mut s.q, &mut s.k, &mut s.v, &mut s.out, &mut c.q, &mut c.k, &mut c.v, &mut c.out,
                &mut l.fc1, &mut l.fc2,
            ] {
                out.push((lin, false));
            }
        }
        out
    }
    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::new();
        for l in &self.encoder {
            let a = &l.attn;
            out.extend([&a.q, &a.k, &a.v, &a.out, &l.fc1, &l.fc2]);
        }
        for l in &self.decoder {
            let (s, c) = (&l.self_attn, &l.cross_attn);
            out.extend([
                &s.q, &s.k, &s.v, &s.out, &c.q, &c.k, &c.v, &c.out, &l.fc1, &l.fc2,
            ]);
        }
        out
    }
    fn task_type(&self) -> &'static str {
        // The Whisper LoRA recipes (HF's blog, PEFT's example) leave it unset.
        ""
    }
}
