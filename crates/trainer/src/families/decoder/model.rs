//! The llama-family decoder (llama, mistral, qwen2, qwen3, phi3, gemma2, gemma3 text,
//! smollm3) built from differentiable ops.

use crate::families::decoder::config::{DecoderConfig, MlpActivation};
use crate::io::Take;
use crate::lora::{ForwardCtx, Linear, LoraModel};
use crate::ops::{
    blocked_attention, causal_attention, cross_entropy_rows, fast_path, frozen_linear,
    masked_softmax, packed_attention, projected_nll, projected_nll_generic,
    projected_nll_vocab_blocks, rms_norm, rope, swiglu, AttnMask, Frozen, Heads, RopeTables,
    RopeTensors, MASKED,
};
use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var, D};
use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::Arc;

/// The rotation as each attention op takes it.
enum Rotary {
    Fused(RopeTables),
    Tensors(RopeTensors),
}

/// The attention's input projections: one each, or phi3's single `qkv_proj` whose
/// output is the queries, then the keys, then the values.
#[allow(clippy::large_enum_variant)] // one per layer: boxing would save nothing that matters
enum Qkv {
    Split { q: Linear, k: Linear, v: Linear },
    Fused(Linear),
}

/// The MLP's gate and up projections: one each, or phi3's single `gate_up_proj` whose
/// output is the gate, then the up half.
enum GateUp {
    Split { gate: Linear, up: Linear },
    Fused(Linear),
}

/// An RMSNorm's weight as the file stores it, and as the norm multiplies by: the same,
/// or `1 + w` for gemma's offset norms (added once in f32, as transformers does per call).
struct Norm {
    stored: Tensor,
    scale: Tensor,
}

impl Norm {
    fn new(stored: Tensor, unit_offset: bool) -> Result<Self> {
        let scale = if unit_offset {
            (&stored + 1.0)?
        } else {
            stored.clone()
        };
        Ok(Self { stored, scale })
    }

    fn forward(&self, x: &Tensor, eps: f64) -> Result<Tensor> {
        Ok(rms_norm(x, &self.scale, eps)?)
    }
}

struct Layer {
    input_norm: Norm,
    /// The norm before the MLP: llama's `post_attention_layernorm`, gemma's
    /// `pre_feedforward_layernorm`.
    pre_mlp_norm: Norm,
    /// gemma's norms of the attention's and the MLP's outputs
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`).
    out_norms: Option<(Norm, Norm)>,
    /// Per-head query and key norms (qwen3, gemma3).
    qk_norm: Option<(Norm, Norm)>,
    /// Attends through the sliding window (with the local rotation where it differs).
    sliding: bool,
    /// Rotates its queries and keys (smollm3's NoPE layers do not).
    rotate: bool,
    qkv: Qkv,
    o: Linear,
    gate_up: GateUp,
    down: Linear,
}

impl Layer {
    /// Its linear modules in the model's order (q, k, v, o, gate, up, down).
    fn linears(&self) -> Vec<&Linear> {
        let mut out = match &self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(p) => vec![p],
        };
        out.push(&self.o);
        match &self.gate_up {
            GateUp::Split { gate, up } => out.extend([gate, up]),
            GateUp::Fused(p) => out.push(p),
        }
        out.push(&self.down);
        out
    }

    fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut out = match &mut self.qkv {
            Qkv::Split { q, k, v } => vec![q, k, v],
            Qkv::Fused(p) => vec![p],
        };
        out.push(&mut self.o);
        match &mut self.gate_up {
            GateUp::Split { gate, up } => out.extend([gate, up]),
            GateUp::Fused(p) => out.push(p),
        }
        out.push(&mut self.down);
        out
    }
}

/// Columns `[start, start + len)` of `(n, width)` rows, laid out on their own.
fn columns(x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
    Ok(x.narrow(1, start, len)?.contiguous()?)
}

/// The mask and rotation one kind of layer attends with in a pass.
struct View {
    /// The `(b, t, past + t)` mask; `None` where only the packed fused op attends, which
    /// masks each sequence itself.
    mask: Option<AttnMask>,
    /// The sliding layers' window.
    window: Option<usize>,
    cos: Tensor,
    sin: Tensor,
    /// The rotation for the one-op attention; `None` on the cached (generation) path.
    tables: Option<Rotary>,
    /// Packed rows: the sequences `(first token row, rows)`, which the fused op computes
    /// one by one.
    segments: Option<Arc<Vec<(usize, usize)>>>,
}

/// What the layers of one forward pass share.
struct Pass {
    b: usize,
    t: usize,
    /// For every layer, or the full-attention ones where some layers slide.
    global: View,
    /// For the sliding layers, where only some layers slide.
    local: Option<View>,
}

impl View {
    fn full_mask(&self) -> Result<&AttnMask> {
        self.mask
            .as_ref()
            .ok_or_else(|| Error::Model("attention: this pass built no mask".into()))
    }
}

impl Pass {
    fn view(&self, layer: &Layer) -> &View {
        match &self.local {
            Some(l) if layer.sliding => l,
            _ => &self.global,
        }
    }
}

/// A packed output matrix whose expansion would pass this is expanded a block of
/// vocabulary rows at a time by the loss (smaller ones whole, which keeps a packed base
/// bit-identical to its dequantized twin).
pub(crate) const HEAD_WHOLE_BYTES: usize = 256 << 20;
/// Values per block of the blocked loss: 64 MiB of f32.
pub(crate) const HEAD_BLOCK_ELEMS: usize = 16 << 20;

/// Whether the training loss expands `w` in blocks of rows ([`HEAD_WHOLE_BYTES`]).
fn head_in_blocks(w: &Frozen) -> bool {
    let (v, d) = w.dims2().unwrap_or((0, 0));
    matches!(w, Frozen::Packed(_)) && v * d * w.dtype().size_in_bytes() > HEAD_WHOLE_BYTES
}

/// The sequences `(first token row of the (b·t) rows, rows)` of a batch some of whose
/// rows pack several ([`sequences`]); `None` when every row holds one, whose positions are
/// `0..t` as ever.
fn packed_sequences(attention_mask: &[Vec<u32>], t: usize) -> Option<Vec<(usize, usize)>> {
    let seqs = sequences(attention_mask, t);
    seqs.windows(2)
        .any(|w| w[0].0 / t == w[1].0 / t)
        .then_some(seqs)
}

/// Per-token positions `(b·t)` of packed sequences: each restarts at 0, and padding sits
/// at 0 (it is never attended to, and must not count against the model's positions).
fn positions(seqs: &[(usize, usize)], b: usize, t: usize) -> Vec<u32> {
    let mut pos = vec![0u32; b * t];
    for &(r0, n) in seqs {
        for (i, p) in pos[r0..r0 + n].iter_mut().enumerate() {
            *p = i as u32;
        }
    }
    pos
}

/// The runs of equal non-zero sequence ids in each row of `attention_mask`, as
/// `(first token row of the (b·t) rows, rows)`.
fn sequences(attention_mask: &[Vec<u32>], t: usize) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    for (bi, row) in attention_mask.iter().enumerate() {
        let id = |i: usize| row.get(i).copied().unwrap_or(1);
        let mut start = 0;
        for i in 1..=t {
            if i == t || id(i) != id(start) {
                if id(start) != 0 {
                    out.push((bi * t + start, i - start));
                }
                start = i;
            }
        }
    }
    out
}

/// Per-layer key/value cache for generation.
#[derive(Default, Clone)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// Number of cached positions.
    pub fn len(&self) -> usize {
        self.layers
            .first()
            .and_then(|l| l.as_ref())
            .map(|(k, _)| k.dim(2).unwrap_or(0))
            .unwrap_or(0)
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct Decoder {
    pub cfg: DecoderConfig,
    embed: Frozen,
    layers: Vec<Layer>,
    norm: Norm,
    /// `None` when tied to the embedding.
    lm_head: Option<Linear>,
    /// RoPE's inverse frequencies `(1, head_dim / 2)`, and the sliding layers' where
    /// they differ; the angles are computed per pass for the positions it covers.
    inv_freq: Tensor,
    local_inv_freq: Option<Tensor>,
    /// The compute dtype of the rotation tables.
    rope_dtype: DType,
    device: Device,
}

impl Decoder {
    /// Builds the model from HF-named weights (consumed), dense or packed; norms and
    /// biases are expanded to f32 here.
    pub fn new(
        cfg: DecoderConfig,
        mut w: HashMap<String, Frozen>,
        device: &Device,
    ) -> Result<Self> {
        let w = &mut Take::new(&mut w, "model");
        let dense = |w: &mut Take<Frozen>, name: &str| -> Result<Tensor> {
            Ok(w.get(name)?.dense()?.to_dtype(DType::F32)?)
        };
        let offset = cfg.norm_unit_offset;
        let norm = |w: &mut Take<Frozen>, name: &str| -> Result<Norm> {
            Norm::new(dense(w, name)?, offset)
        };
        let linear = |w: &mut Take<Frozen>, path: String, bias: bool| -> Result<Linear> {
            let weight = w.get(&format!("{path}.weight"))?;
            let b = if bias {
                Some(dense(w, &format!("{path}.bias"))?)
            } else {
                None
            };
            Ok(Linear::new(path, weight, b))
        };
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv = if cfg.fused_projections {
                Qkv::Fused(linear(w, format!("{p}.self_attn.qkv_proj"), cfg.qkv_bias)?)
            } else {
                Qkv::Split {
                    q: linear(w, format!("{p}.self_attn.q_proj"), cfg.qkv_bias)?,
                    k: linear(w, format!("{p}.self_attn.k_proj"), cfg.qkv_bias)?,
                    v: linear(w, format!("{p}.self_attn.v_proj"), cfg.qkv_bias)?,
                }
            };
            let gate_up = if cfg.fused_projections {
                GateUp::Fused(linear(w, format!("{p}.mlp.gate_up_proj"), cfg.mlp_bias)?)
            } else {
                GateUp::Split {
                    gate: linear(w, format!("{p}.mlp.gate_proj"), cfg.mlp_bias)?,
                    up: linear(w, format!("{p}.mlp.up_proj"), cfg.mlp_bias)?,
                }
            };
            let post_attention = norm(w, &format!("{p}.post_attention_layernorm.weight"))?;
            let (pre_mlp_norm, out_norms) = if cfg.sandwich_norms {
                let pre = norm(w, &format!("{p}.pre_feedforward_layernorm.weight"))?;
                let post = norm(w, &format!("{p}.post_feedforward_layernorm.weight"))?;
                (pre, Some((post_attention, post)))
            } else {
                (post_attention, None)
            };
            layers.push(Layer {
                input_norm: norm(w, &format!("{p}.input_layernorm.weight"))?,
                pre_mlp_norm,
                out_norms,
                qk_norm: if cfg.qk_norm {
                    Some((
                        norm(w, &format!("{p}.self_attn.q_norm.weight"))?,
                        norm(w, &format!("{p}.self_attn.k_norm.weight"))?,
                    ))
                } else {
                    None
                },
                sliding: cfg.layer_is_sliding(i),
                rotate: cfg.layer_rotates(i),
                qkv,
                o: linear(w, format!("{p}.self_attn.o_proj"), cfg.o_bias)?,
                gate_up,
                down: linear(w, format!("{p}.mlp.down_proj"), cfg.mlp_bias)?,
            });
        }
        let embed = w.get("model.embed_tokens.weight")?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            // Some checkpoints tie without saying so: no lm_head means tied.
            w.get_opt("lm_head.weight")
                .map(|t| Linear::new("lm_head".into(), t, None))
        };
        let norm = norm(w, "model.norm.weight")?;
        // A weight left unread is a part of the architecture not built here (a norm, a
        // bias): the model would compute something other than the checkpoint. Rotary
        // buffers saved by old transformers, and a tied head saved anyway, are not weights.
        let unread: Vec<&str> = w
            .rest()
            .into_iter()
            .filter(|k| !k.ends_with("rotary_emb.inv_freq"))
            .filter(|k| !(cfg.tie_word_embeddings && *k == "lm_head.weight"))
            .collect();
        if !unread.is_empty() {
            return Err(Error::Unsupported(format!(
                "{} weights this {} decoder does not read, e.g. {}",
                unread.len(),
                cfg.model_type,
                unread[..unread.len().min(3)].join(", ")
            )));
        }
        if embed.dims() != [cfg.vocab_size, cfg.hidden_size] {
            return Err(Error::Model(format!(
                "embed_tokens has shape {:?}, config says ({}, {})",
                embed.dims(),
                cfg.vocab_size,
                cfg.hidden_size
            )));
        }
        let row = |inv: Vec<f32>| -> Result<Tensor> {
            let half = inv.len();
            Ok(Tensor::from_vec(inv, (1, half), device)?)
        };
        // Only sliding layers use the local frequencies: without any, none are built.
        let any_sliding = (0..cfg.num_hidden_layers).any(|i| cfg.layer_is_sliding(i));
        Ok(Self {
            inv_freq: row(cfg.inv_freq())?,
            local_inv_freq: match cfg.local_inv_freq() {
                Some(inv) if any_sliding => Some(row(inv)?),
                _ => None,
            },
            rope_dtype: DType::F32,
            cfg,
            embed,
            layers,
            norm,
            lm_head,
            device: device.clone(),
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The compute precision of the products, as torch's autocast runs a model: linear
    /// layers (and the embedding table, the rotary tables and the attention between
    /// them) in `dtype`, while the residual stream, the norms (their weights stay f32),
    /// the softmax and the loss stay f32. LoRA weights stay f32 too, cast per product.
    /// (All of it in bf16, residual stream included, trains measurably worse: SmolLM2's
    /// loss was 12-16% above f32's after 20 steps.)
    pub fn set_dtype(&mut self, dtype: DType) -> Result<()> {
        self.embed = self.embed.with_dtype(dtype)?;
        self.rope_dtype = dtype;
        for (lin, _) in self.linears_mut() {
            lin.cast_frozen(dtype)?;
        }
        Ok(())
    }

    pub fn dtype(&self) -> DType {
        self.embed.dtype()
    }

    /// Additive mask `(b, 1, t, past + t)`: causal, padded keys hidden, keys `window` or
    /// more positions behind the query hidden, and (packed rows) keys of another sequence
    /// hidden. `attention_mask` holds a sequence id per token, 0 for padding (a plain
    /// padded batch has 1 for every real token).
    fn mask(
        &self,
        b: usize,
        t: usize,
        past: usize,
        attention_mask: Option<&[Vec<u32>]>,
        window: Option<usize>,
    ) -> Result<AttnMask> {
        let tk = past + t;
        let mut m = vec![0f32; b * t * tk];
        let id = |bi: usize, j: usize| {
            attention_mask.map_or(1, |am| am[bi].get(j).copied().unwrap_or(1))
        };
        for bi in 0..b {
            for i in 0..t {
                let query = id(bi, past + i);
                for j in 0..tk {
                    let causal_ok = j <= past + i && window.is_none_or(|w| past + i - j < w);
                    let key = id(bi, j);
                    // A padding query attends as before; its output is never scored.
                    let key_ok = key != 0 && (query == 0 || key == query);
                    if !(causal_ok && key_ok) {
                        m[(bi * t + i) * tk + j] = MASKED;
                    }
                }
            }
        }
        Ok(AttnMask::new(m, b, t, tk, &self.device)?)
    }

    /// What every layer of one pass shares: the mask, the rotation, and the embedded
    /// input rows `(b·t, d)` in f32.
    fn prepare(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        past: usize,
        cached: bool,
    ) -> Result<(Tensor, Pass)> {
        let (b, t) = input_ids.dims2()?;
        let d = self.cfg.hidden_size;
        let segments = (past == 0)
            .then(|| attention_mask.and_then(|am| packed_sequences(am, t)))
            .flatten()
            .map(Arc::new);
        let packed = segments.as_deref().map(|s| positions(s, b, t));
        // A packed row's sequences each restart at position 0.
        let positions = packed
            .as_ref()
            .map_or(past + t, |p| p.iter().max().map_or(0, |&m| m as usize + 1));
        if positions > self.cfg.max_position_embeddings {
            return Err(Error::Data(format!(
                "sequence of {positions} tokens exceeds the model's {} positions",
                self.cfg.max_position_embeddings
            )));
        }
        let mut x = self
            .embed
            .rows(&input_ids.flatten_all()?)?
            .reshape((b * t, d))?
            .to_dtype(DType::F32)?;
        if self.cfg.scale_embeddings {
            // transformers multiplies by the scale in the table's dtype: f32 here, as
            // under autocast (the table stays f32 there too).
            x = (x * ((d as f64).sqrt() as f32) as f64)?;
        }
        // Without a cache (training, evaluation) attention is one op that keeps only its
        // inputs: fused on CPU in f32, in query blocks on other devices and dtypes.
        let fused = fast_path(&x) && self.dtype() == DType::F32;
        // `(t, half)` angles for positions shared by every row, `(b, 1, t, half)` per token.
        let angles = |pos: Tensor, shape: &[usize], inv: &Tensor| -> Result<(Tensor, Tensor)> {
            let freqs = pos
                .to_dtype(DType::F32)?
                .reshape((pos.elem_count(), 1))?
                .broadcast_mul(inv)?;
            let shape = [shape, &[freqs.dim(1)?]].concat();
            Ok((
                freqs
                    .cos()?
                    .to_dtype(self.rope_dtype)?
                    .reshape(shape.as_slice())?,
                freqs
                    .sin()?
                    .to_dtype(self.rope_dtype)?
                    .reshape(shape.as_slice())?,
            ))
        };
        let from = |start: usize| Tensor::arange(start as u32, (start + t) as u32, &self.device);
        let view = |inv: &Tensor, window: Option<usize>| -> Result<View> {
            let (cos, sin) = match &packed {
                // Packed rows: each sequence restarts at position 0.
                Some(p) => angles(Tensor::new(p.as_slice(), &self.device)?, &[b, 1, t], inv)?,
                None => angles(from(past)?, &[t], inv)?,
            };
            let half = *cos.dims().last().unwrap_or(&0);
            // Soft-capped scores (gemma2) take the op-by-op path, which keeps them.
            let whole = !cached
                && 2 * half == self.cfg.head_dim
                && self.cfg.attn_logit_softcapping.is_none();
            let tables = match (whole, fused) {
                (false, _) => None,
                // The fused op runs packed sequences one at a time from position 0: the
                // tables of positions `0..t` serve each of them.
                (true, true) => Some(Rotary::Fused(match &packed {
                    Some(_) => {
                        let (c, s) = angles(from(0)?, &[t], inv)?;
                        RopeTables::new(&c, &s)?
                    }
                    None => RopeTables::new(&cos, &sin)?,
                })),
                (true, false) => Some(Rotary::Tensors(RopeTensors {
                    cos: cos.clone(),
                    sin: sin.clone(),
                })),
            };
            let packed_fused = segments.is_some() && matches!(tables, Some(Rotary::Fused(_)));
            Ok(View {
                mask: (!packed_fused)
                    .then(|| self.mask(b, t, past, attention_mask, window))
                    .transpose()?,
                window,
                cos,
                sin,
                tables,
                segments: segments.clone(),
            })
        };
        let (global, local) = if self.cfg.sliding_layers.is_some() {
            let any_sliding = self.layers.iter().any(|l| l.sliding);
            let local = if any_sliding {
                let inv = self.local_inv_freq.as_ref().unwrap_or(&self.inv_freq);
                Some(view(inv, self.cfg.sliding_window)?)
            } else {
                None
            };
            (view(&self.inv_freq, None)?, local)
        } else {
            (view(&self.inv_freq, self.cfg.sliding_window)?, None)
        };
        Ok((
            x,
            Pass {
                b,
                t,
                global,
                local,
            },
        ))
    }

    /// One decoder layer on the residual stream `x` (`(b·t, d)`, f32).
    fn block(
        &self,
        layer: &Layer,
        x: &Tensor,
        pass: &Pass,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let cd = self.dtype();
        let (b, t) = (pass.b, pass.t);
        let eps = self.cfg.rms_norm_eps;
        let view = pass.view(layer);
        let h = layer.input_norm.forward(x, eps)?.to_dtype(cd)?;
        let a = match &view.tables {
            Some(r) => self.fused_attention(layer, &h, b, t, view, r, ctx)?,
            None => self.attention(
                layer,
                &h,
                b,
                t,
                view.full_mask()?,
                &view.cos,
                &view.sin,
                slot,
                ctx,
            )?,
        };
        let mut a = a.to_dtype(DType::F32)?;
        if let Some((after_attention, _)) = &layer.out_norms {
            a = after_attention.forward(&a, eps)?;
        }
        let x = (x + a)?;
        let h = layer.pre_mlp_norm.forward(&x, eps)?.to_dtype(cd)?;
        let (g, u) = match &layer.gate_up {
            GateUp::Split { gate, up } => (gate.forward(&h, ctx)?, up.forward(&h, ctx)?),
            GateUp::Fused(p) => {
                let y = p.forward(&h, ctx)?;
                let i = self.cfg.intermediate_size;
                (columns(&y, 0, i)?, columns(&y, i, i)?)
            }
        };
        let (g, u) = (g.to_dtype(cd)?, u.to_dtype(cd)?);
        let glu = match self.cfg.mlp_activation {
            MlpActivation::Silu => swiglu(&g, &u)?,
            // candle's `gelu` is the tanh approximation, transformers' gelu_pytorch_tanh.
            MlpActivation::GeluTanh => (g.gelu()? * u)?,
        };
        let mut m = layer.down.forward(&glu, ctx)?.to_dtype(DType::F32)?;
        if let Some((_, after_mlp)) = &layer.out_norms {
            m = after_mlp.forward(&m, eps)?;
        }
        Ok((x + m)?)
    }

    /// Hidden states before the final norm, `(b, t, d)`.
    pub fn forward_hidden(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let past = cache.as_ref().map(|c| c.len()).unwrap_or(0);
        let (mut x, pass) = self.prepare(input_ids, attention_mask, past, cache.is_some())?;
        let mut cache = cache;
        if let Some(c) = cache.as_deref_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[li]);
            x = self.block(layer, &x, &pass, slot, ctx)?;
        }
        Ok(x.reshape((b, t, self.cfg.hidden_size))?)
    }

    /// Training's summed loss and its gradients with activation checkpointing: the
    /// forward pass keeps only each layer's input, and the backward pass recomputes one
    /// layer at a time (same dropout draws) and backpropagates through it alone. Memory
    /// for activations falls from every layer's to one layer's plus an `(n, d)` input per
    /// layer, for one more forward pass of compute. `scale` divides the loss before the
    /// gradients are taken (the step's scored units).
    pub fn checkpointed_loss_and_grads(
        &self,
        input_ids: &Tensor,
        attention_mask: &[Vec<u32>],
        labels: &[Vec<i64>],
        ctx: &ForwardCtx,
        scale: f64,
    ) -> Result<(f64, GradStore)> {
        let (b, t) = input_ids.dims2()?;
        self.checkpointed_grads(input_ids, attention_mask, ctx, scale, &|h| {
            Ok(scored_loss(self, h, b, t, labels, ctx)?.0)
        })
    }

    /// [`Self::checkpointed_loss_and_grads`] for any summed loss `top` of the last
    /// layer's `(b·t, d)` output rows (before the final norm): DPO's as well as the
    /// token loss.
    pub fn checkpointed_grads(
        &self,
        input_ids: &Tensor,
        attention_mask: &[Vec<u32>],
        ctx: &ForwardCtx,
        scale: f64,
        top: &dyn Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(f64, GradStore)> {
        let (mut x, pass) = self.prepare(input_ids, Some(attention_mask), 0, false)?;
        let mut saved = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            let rng = ctx.rng.borrow().clone();
            let out = self.block(layer, &x, &pass, None, ctx)?.detach();
            saved.push((std::mem::replace(&mut x, out), rng));
        }
        let last = Var::from_tensor(&x)?;
        let loss = top(last.as_tensor())?;
        let value = loss.to_scalar::<f32>()? as f64;
        let mut grads = (loss / scale)?.backward()?;
        let Some(mut g) = grads.remove(last.as_tensor()) else {
            // Nothing scored: no gradient reaches the layers.
            return Ok((value, grads));
        };
        for (layer, (input, rng)) in self.layers.iter().zip(saved).rev() {
            let input = Var::from_tensor(&input)?;
            let replay = ForwardCtx {
                train: ctx.train,
                rng: RefCell::new(rng),
                adapters: ctx.adapters,
            };
            let out = self.block(layer, input.as_tensor(), &pass, None, &replay)?;
            // d(Σ out·g)/d out = g exactly: the layer's backward sees the true gradient.
            let mut inner = (out * &g)?.sum_all()?.backward()?;
            for lin in layer.linears() {
                if let Some(l) = &lin.lora {
                    for v in [&l.a, &l.b] {
                        if let Some(gv) = inner.remove(v.as_tensor()) {
                            grads.insert(v.as_tensor(), gv);
                        }
                    }
                }
            }
            g = inner.remove(input.as_tensor()).ok_or_else(|| {
                Error::Model("checkpointing: no gradient reached a layer's input".into())
            })?;
        }
        Ok((value, grads))
    }

    /// The query, key and value projections of `(b·t, d)` rows, in the compute dtype,
    /// each query and key head normalised first where the model does (qwen3: in f32, as
    /// transformers' RMSNorm).
    fn queries_keys_values(
        &self,
        l: &Layer,
        h: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let cd = h.dtype();
        let (q, k, v) = match &l.qkv {
            Qkv::Split { q, k, v } => (q.forward(h, ctx)?, k.forward(h, ctx)?, v.forward(h, ctx)?),
            Qkv::Fused(p) => {
                let y = p.forward(h, ctx)?;
                let nq = self.cfg.num_attention_heads * self.cfg.head_dim;
                let nkv = self.cfg.num_key_value_heads * self.cfg.head_dim;
                (
                    columns(&y, 0, nq)?,
                    columns(&y, nq, nkv)?,
                    columns(&y, nq + nkv, nkv)?,
                )
            }
        };
        let v = v.to_dtype(cd)?;
        let Some((qn, kn)) = &l.qk_norm else {
            return Ok((q.to_dtype(cd)?, k.to_dtype(cd)?, v));
        };
        let hd = self.cfg.head_dim;
        let per_head = |x: Tensor, w: &Norm| -> Result<Tensor> {
            let (n, width) = x.dims2()?;
            let x = x.to_dtype(DType::F32)?.reshape((n, width / hd, hd))?;
            Ok(w.forward(&x, self.cfg.rms_norm_eps)?
                .reshape((n, width))?
                .to_dtype(cd)?)
        };
        Ok((per_head(q, qn)?, per_head(k, kn)?, v))
    }

    /// Attention through [`causal_attention`] or [`blocked_attention`], which keep only
    /// the projections' outputs.
    #[allow(clippy::too_many_arguments)]
    fn fused_attention(
        &self,
        l: &Layer,
        h: &Tensor,
        b: usize,
        t: usize,
        view: &View,
        rope: &Rotary,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let heads = Heads {
            b,
            t,
            tk: t,
            q: self.cfg.num_attention_heads,
            kv: self.cfg.num_key_value_heads,
            dim: self.cfg.head_dim,
        };
        let scale = self.cfg.attention_scale();
        let (q, k, v) = self.queries_keys_values(l, h, ctx)?;
        let out = match rope {
            Rotary::Fused(r) => {
                let r = l.rotate.then_some(r);
                match &view.segments {
                    Some(s) => {
                        packed_attention(&q, &k, &v, heads, scale, r, view.window, s.clone())?
                    }
                    None => causal_attention(&q, &k, &v, heads, scale, r, view.full_mask()?)?,
                }
            }
            Rotary::Tensors(r) => {
                let r = l.rotate.then_some(r);
                blocked_attention(&q, &k, &v, heads, scale, r, Some(&view.full_mask()?.tensor))?
            }
        };
        l.o.forward(&out, ctx)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        l: &Layer,
        h: &Tensor,
        b: usize,
        t: usize,
        mask: &AttnMask,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (nh, nkv, hd) = (
            self.cfg.num_attention_heads,
            self.cfg.num_key_value_heads,
            self.cfg.head_dim,
        );
        let heads = |x: Tensor, n: usize| -> Result<Tensor> {
            Ok(x.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()?)
        };
        let (q, k, v) = self.queries_keys_values(l, h, ctx)?;
        let q = heads(q, nh)?;
        let k = heads(k, nkv)?;
        let v = heads(v, nkv)?;
        let (q, mut k) = if l.rotate {
            (rope(&q, cos, sin)?, rope(&k, cos, sin)?)
        } else {
            (q, k)
        };
        let mut v = v;
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let tk = k.dim(2)?;
        let rep = nh / nkv;
        let repeat = |x: Tensor| -> Result<Tensor> {
            if rep == 1 {
                return Ok(x);
            }
            Ok(x.unsqueeze(2)?
                .broadcast_as((b, nkv, rep, tk, hd))?
                .reshape((b, nh, tk, hd))?)
        };
        let k = repeat(k)?;
        let v = repeat(v)?;
        let scale = self.cfg.attention_scale();
        // gemm reads the transposed keys in place; scale and mask are folded into the softmax.
        let scores = q.matmul(&k.t()?)?;
        let p = match self.cfg.attn_logit_softcapping {
            // As transformers: scaled, then `cap · tanh(s / cap)`, then masked.
            Some(cap) => {
                let s = ((scores * scale)? / cap)?.tanh()?;
                masked_softmax(&(s * cap)?, 1.0, mask)?
            }
            None => masked_softmax(&scores, scale, mask)?,
        };
        let out = p.matmul(&v)?; // (b, nh, t, hd)
        let out = out
            .transpose(1, 2)?
            .contiguous()?
            .reshape((b * t, nh * hd))?;
        l.o.forward(&out, ctx)
    }

    /// Final norm and output head on `(n, d)` hidden rows: `(n, vocab)` logits.
    pub fn head(&self, hidden_rows: &Tensor) -> Result<Tensor> {
        self.head_with(hidden_rows, true)
    }

    /// [`Self::head`], with the output head's adapter left out unless `adapters`.
    fn head_with(&self, hidden_rows: &Tensor, adapters: bool) -> Result<Tensor> {
        let h = self
            .norm
            .forward(hidden_rows, self.cfg.rms_norm_eps)?
            .to_dtype(self.dtype())?;
        let ctx = ForwardCtx {
            adapters,
            ..ForwardCtx::eval()
        };
        let logits = match &self.lm_head {
            Some(l) => l.forward(&h, &ctx)?,
            None => frozen_linear(&h, &self.embed)?,
        };
        match self.cfg.final_logit_softcapping {
            Some(cap) => Ok(((logits.to_dtype(DType::F32)? / cap)?.tanh()? * cap)?),
            None => Ok(logits),
        }
    }

    /// Training's per-row NLL of `(n, d)` hidden rows against `targets`, through
    /// [`projected_nll`] (no `(n, vocab)` logits kept; [`projected_nll_generic`] off the
    /// CPU or f32) when the output matrix is frozen and the logits are not soft-capped;
    /// `None` otherwise.
    fn head_nll(
        &self,
        hidden_rows: &Tensor,
        targets: &[u32],
        adapters: bool,
    ) -> Result<Option<Tensor>> {
        if self.cfg.final_logit_softcapping.is_some() {
            return Ok(None);
        }
        let w = match &self.lm_head {
            None => &self.embed,
            Some(l) if (l.lora.is_none() || !adapters) && l.bias.is_none() => &l.weight,
            Some(_) => return Ok(None),
        };
        let h = self
            .norm
            .forward(hidden_rows, self.cfg.rms_norm_eps)?
            .to_dtype(self.dtype())?;
        if head_in_blocks(w) {
            return Ok(Some(projected_nll_vocab_blocks(
                &h,
                w,
                targets,
                true,
                HEAD_BLOCK_ELEMS,
            )?));
        }
        let w = w.dense()?;
        if fast_path(&h) && fast_path(&w) {
            Ok(Some(projected_nll(&h, &w, targets, true)?))
        } else {
            Ok(Some(projected_nll_generic(&h, &w, targets, true)?))
        }
    }

    /// Full logits `(b, t, vocab)`.
    pub fn logits(
        &self,
        input_ids: &Tensor,
        attention_mask: Option<&[Vec<u32>]>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, t) = input_ids.dims2()?;
        let h = self.forward_hidden(input_ids, attention_mask, None, ctx)?;
        let l = self.head(&h.reshape((b * t, self.cfg.hidden_size))?)?;
        Ok(l.reshape((b, t, self.cfg.vocab_size))?)
    }

    /// Every frozen weight under its HF name, with adapters merged in (for `merge`).
    pub fn merged_weights(&self) -> Result<Vec<(String, Tensor)>> {
        let mut out = vec![("model.embed_tokens.weight".to_string(), self.embed.dense()?)];
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            let mut norm = |name: &str, n: &Norm| {
                out.push((format!("{p}.{name}.weight"), n.stored.clone()));
            };
            norm("input_layernorm", &l.input_norm);
            match &l.out_norms {
                Some((after_attention, after_mlp)) => {
                    norm("post_attention_layernorm", after_attention);
                    norm("pre_feedforward_layernorm", &l.pre_mlp_norm);
                    norm("post_feedforward_layernorm", after_mlp);
                }
                None => norm("post_attention_layernorm", &l.pre_mlp_norm),
            }
            if let Some((qn, kn)) = &l.qk_norm {
                norm("self_attn.q_norm", qn);
                norm("self_attn.k_norm", kn);
            }
            for lin in l.linears() {
                out.push((format!("{}.weight", lin.path), lin.merged_weight()?));
                if let Some(b) = &lin.bias {
                    out.push((format!("{}.bias", lin.path), b.clone()));
                }
            }
        }
        out.push(("model.norm.weight".into(), self.norm.stored.clone()));
        if let Some(h) = &self.lm_head {
            out.push(("lm_head.weight".into(), h.merged_weight()?));
        }
        Ok(out)
    }
}

impl LoraModel for Decoder {
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        let mut out: Vec<(&mut Linear, bool)> = Vec::new();
        for l in self.layers.iter_mut() {
            out.extend(l.linears_mut().into_iter().map(|lin| (lin, false)));
        }
        if let Some(h) = self.lm_head.as_mut() {
            out.push((h, true));
        }
        out
    }
    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::new();
        for l in &self.layers {
            out.extend(l.linears());
        }
        out.extend(self.lm_head.as_ref());
        out
    }
    fn task_type(&self) -> &'static str {
        "CAUSAL_LM"
    }
}

/// The next-token loss as transformers computes it with `labels`: position `p`
/// predicts `labels[p + 1]`, `-100` is ignored. Returns the summed NLL, the number of
/// scored tokens and how many the model's argmax got right.
pub fn causal_lm_loss(
    model: &Decoder,
    input_ids: &Tensor,
    attention_mask: &[Vec<u32>],
    labels: &[Vec<i64>],
    ctx: &ForwardCtx,
) -> Result<(Tensor, usize, Option<usize>)> {
    let (b, t) = input_ids.dims2()?;
    if nothing_scored(labels, t) {
        return Ok((Tensor::zeros((), DType::F32, model.device())?, 0, None));
    }
    let h = model.forward_hidden(input_ids, Some(attention_mask), None, ctx)?;
    let h = h.reshape((b * t, model.cfg.hidden_size))?;
    scored_loss(model, &h, b, t, labels, ctx)
}

/// The loss of `(b·t, d)` hidden rows (before the final norm) against `labels`.
fn scored_loss(
    model: &Decoder,
    h: &Tensor,
    b: usize,
    t: usize,
    labels: &[Vec<i64>],
    ctx: &ForwardCtx,
) -> Result<(Tensor, usize, Option<usize>)> {
    match scored_nll(model, h, b, t, labels, ctx)? {
        None => Ok((Tensor::zeros((), DType::F32, model.device())?, 0, None)),
        Some(s) => Ok((s.nll.sum_all()?, s.seq.len(), s.correct)),
    }
}

/// Whether no label after the first position of any row is scored (nothing to compute).
fn nothing_scored(labels: &[Vec<i64>], t: usize) -> bool {
    !labels.iter().any(|lab| {
        lab.iter()
            .skip(1)
            .take(t.saturating_sub(1))
            .any(|&y| y >= 0)
    })
}

/// The scored rows' negative log-likelihoods, `(n,)`.
struct ScoredNll {
    nll: Tensor,
    /// The sequence of each row.
    seq: Vec<usize>,
    /// With an eval `ctx`: how many rows the model's argmax gets right.
    correct: Option<usize>,
}

/// The NLL of the scored rows of `(b·t, d)` hidden rows (before the final norm), only
/// those rows going through the vocabulary projection: fused ([`Decoder::head_nll`]) in
/// training, through full logits otherwise. `None` when nothing is scored.
fn scored_nll(
    model: &Decoder,
    h: &Tensor,
    b: usize,
    t: usize,
    labels: &[Vec<i64>],
    ctx: &ForwardCtx,
) -> Result<Option<ScoredNll>> {
    let (rows, targets, seq) = scored_rows(labels, b, t);
    let n = rows.len();
    if n == 0 {
        return Ok(None);
    }
    let idx = Tensor::from_vec(rows, n, model.device())?;
    let h = h.index_select(&idx, 0)?;
    if ctx.train {
        if let Some(nll) = model.head_nll(&h, &targets, ctx.adapters)? {
            return Ok(Some(ScoredNll {
                nll,
                seq,
                correct: None,
            }));
        }
    }
    let logits = model.head_with(&h, ctx.adapters)?.to_dtype(DType::F32)?;
    let correct = if ctx.train {
        None
    } else {
        let am: Vec<u32> = logits.argmax(D::Minus1)?.to_vec1()?;
        Some(am.iter().zip(&targets).filter(|(a, b)| a == b).count())
    };
    Ok(Some(ScoredNll {
        nll: cross_entropy_rows(&logits, &targets)?,
        seq,
        correct,
    }))
}

/// The positions of `(b·t)` rows that are scored (position `p` predicts `labels[p + 1]`),
/// their targets, and the sequence each belongs to.
fn scored_rows(labels: &[Vec<i64>], b: usize, t: usize) -> (Vec<u32>, Vec<u32>, Vec<usize>) {
    let (mut rows, mut targets, mut seq) = (Vec::new(), Vec::new(), Vec::new());
    for (bi, lab) in labels.iter().enumerate().take(b) {
        for p in 0..t.saturating_sub(1) {
            let y = lab.get(p + 1).copied().unwrap_or(-100);
            if y >= 0 {
                rows.push((bi * t + p) as u32);
                targets.push(y as u32);
                seq.push(bi);
            }
        }
    }
    (rows, targets, seq)
}

/// Per sequence: the summed log-probability of its scored tokens, `(b,)` in f32 and
/// differentiable when `ctx` trains; with an eval `ctx`, also how many of them the
/// model's argmax gets right.
pub fn sequence_logps(
    model: &Decoder,
    input_ids: &Tensor,
    attention_mask: &[Vec<u32>],
    labels: &[Vec<i64>],
    ctx: &ForwardCtx,
) -> Result<(Tensor, Option<usize>)> {
    let (b, t) = input_ids.dims2()?;
    if nothing_scored(labels, t) {
        return Ok((Tensor::zeros(b, DType::F32, model.device())?, None));
    }
    let h = model.forward_hidden(input_ids, Some(attention_mask), None, ctx)?;
    let h = h.reshape((b * t, model.cfg.hidden_size))?;
    logps_of_hidden(model, &h, b, t, labels, ctx)
}

/// [`sequence_logps`] from the last layer's `(b·t, d)` output rows.
pub fn logps_of_hidden(
    model: &Decoder,
    h: &Tensor,
    b: usize,
    t: usize,
    labels: &[Vec<i64>],
    ctx: &ForwardCtx,
) -> Result<(Tensor, Option<usize>)> {
    let Some(ScoredNll { nll, seq, correct }) = scored_nll(model, h, b, t, labels, ctx)? else {
        return Ok((Tensor::zeros(b, DType::F32, model.device())?, None));
    };
    let n = seq.len();
    // A (b, n) indicator of which sequence each row belongs to sums the rows per
    // sequence in one product, through which the gradient flows back row by row.
    let mut member = vec![0f32; b * n];
    for (r, &s) in seq.iter().enumerate() {
        member[s * n + r] = 1.0;
    }
    let member = Tensor::from_vec(member, (b, n), model.device())?;
    let sums = member.matmul(&nll.to_dtype(DType::F32)?.unsqueeze(1)?)?;
    Ok((sums.squeeze(1)?.neg()?, correct))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::BaseDtype;
    use crate::families::decoder::loader::hf_weights;
    use std::path::Path;

    /// qwen3's per-head norms, read as a llama would not read them, are an error naming
    /// them rather than a model that quietly computes without them.
    #[test]
    fn weights_left_unread_are_refused_by_name() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny-qwen3");
        let v = crate::io::read_json(&dir.join("config.json")).unwrap();
        let mut cfg = DecoderConfig::from_hf_json(&v).unwrap();
        let w = hf_weights(&dir, &Device::Cpu, BaseDtype::Auto).unwrap();
        assert!(Decoder::new(cfg.clone(), w.clone(), &Device::Cpu).is_ok());
        cfg.qk_norm = false;
        let e = Decoder::new(cfg, w, &Device::Cpu)
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.contains("4 weights this qwen3 decoder does not read")
                && e.contains("model.layers.0.self_attn.k_norm.weight"),
            "{e}"
        );
    }

    /// Packed rows restart positions per sequence and keep padding at 0, so a long padded
    /// tail never counts against the model's positions; rows of one sequence keep `0..t`.
    #[test]
    fn packed_rows_restart_positions_and_list_their_sequences() {
        let rows = vec![vec![1, 1, 1, 2, 2, 0, 0, 0], vec![1, 2, 3, 3, 3, 3, 3, 0]];
        let seqs = super::packed_sequences(&rows, 8).unwrap();
        assert_eq!(seqs, [(0, 3), (3, 2), (8, 1), (9, 1), (10, 5)]);
        assert_eq!(
            super::positions(&seqs, 2, 8),
            [0, 1, 2, 0, 1, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 0]
        );
        let plain = vec![vec![1, 1, 1, 0], vec![1, 1, 1, 1]];
        assert_eq!(super::packed_sequences(&plain, 4), None);
    }
}
