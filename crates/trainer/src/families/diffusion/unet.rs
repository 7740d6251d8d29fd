//! diffusers' `UNet2DConditionModel` for SD 1.x / 2.x: config, weights and a forward
//! pass whose gradient reaches every LoRA layer.
//!
//! Channel counts come from the weights themselves, so a folder whose config and
//! weights disagree fails on a named tensor rather than computing something else; the
//! config supplies what the weights cannot say (heads, norm groups and epsilons, the
//! block types) and is checked for options this port does not implement.

use super::layers::{attention, linear_nd, Conv, GroupNorm, LayerNorm, ResnetBlock};
use crate::io::read_safetensors_f32;
use crate::io::Take;
use crate::io::Weights;
use crate::lora::{ForwardCtx, Linear, LoraModel};
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// The part of `unet/config.json` this port reads.
#[derive(Debug, Clone, PartialEq)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    /// Attention heads per down block (diffusers' `attention_head_dim`, which despite its
    /// name counts heads in SD 1.x/2.x configs, unless `num_attention_heads` is given).
    pub heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub use_linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    /// Pixel size of the latents the model was trained on (`sample_size`).
    pub sample_size: usize,
}

const DOWN_TYPES: [&str; 2] = ["CrossAttnDownBlock2D", "DownBlock2D"];
const UP_TYPES: [&str; 2] = ["CrossAttnUpBlock2D", "UpBlock2D"];

fn field_usize(v: &Value, key: &str) -> Result<Option<usize>> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => x
            .as_u64()
            .map(|n| Some(n as usize))
            .ok_or_else(|| Error::Config(format!("unet config: {key} must be an integer"))),
    }
}

/// An integer, or a list with one integer per block.
fn per_block(v: &Value, key: &str, blocks: usize) -> Result<Option<Vec<usize>>> {
    let bad = || {
        Error::Config(format!(
            "unet config: {key} must be an integer or a list of {blocks} integers"
        ))
    };
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Array(a)) => {
            let out: Option<Vec<usize>> =
                a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect();
            match out {
                Some(o) if o.len() == blocks => Ok(Some(o)),
                _ => Err(bad()),
            }
        }
        Some(x) => x
            .as_u64()
            .map(|n| Some(vec![n as usize; blocks]))
            .ok_or_else(bad),
    }
}

fn strings(v: &Value, key: &str) -> Result<Vec<String>> {
    v.get(key)
        .and_then(Value::as_array)
        .and_then(|a| a.iter().map(|x| x.as_str().map(str::to_string)).collect())
        .ok_or_else(|| Error::Config(format!("unet config: {key} must be a list of strings")))
}

impl UNetConfig {
    /// Parses diffusers' `unet/config.json`; options this port does not implement are an
    /// error that names them, never ignored.
    pub fn from_diffusers_json(v: &Value) -> Result<Self> {
        let unsupported = |key: &str, why: &str| {
            Error::Unsupported(format!("unet config: {key} ({why}) is not supported yet"))
        };
        // Options whose non-default values change the architecture.
        for (key, default) in [
            ("addition_embed_type", Value::Null),
            ("class_embed_type", Value::Null),
            ("time_cond_proj_dim", Value::Null),
            ("encoder_hid_dim", Value::Null),
            ("encoder_hid_dim_type", Value::Null),
            ("num_class_embeds", Value::Null),
            ("projection_class_embeddings_input_dim", Value::Null),
            ("only_cross_attention", Value::Bool(false)),
            ("dual_cross_attention", Value::Bool(false)),
            ("mid_block_only_cross_attention", Value::Null),
            ("class_embeddings_concat", Value::Bool(false)),
            ("center_input_sample", Value::Bool(false)),
            ("attention_type", Value::String("default".into())),
            ("resnet_time_scale_shift", Value::String("default".into())),
            ("time_embedding_type", Value::String("positional".into())),
            ("act_fn", Value::String("silu".into())),
            ("timestep_post_act", Value::Null),
            ("resnet_skip_time_act", Value::Bool(false)),
            ("resnet_out_scale_factor", Value::from(1.0)),
            ("conv_in_kernel", Value::from(3)),
            ("conv_out_kernel", Value::from(3)),
            ("downsample_padding", Value::from(1)),
            ("mid_block_scale_factor", Value::from(1)),
            (
                "mid_block_type",
                Value::String("UNetMidBlock2DCrossAttn".into()),
            ),
            ("time_embedding_dim", Value::Null),
            ("time_embedding_act_fn", Value::Null),
            ("cross_attention_norm", Value::Null),
            ("reverse_transformer_layers_per_block", Value::Null),
            ("dropout", Value::from(0.0)),
        ] {
            if let Some(x) = v.get(key) {
                let same = match (x, &default) {
                    (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
                    (Value::Bool(false), Value::Null) => true,
                    _ => x == &default,
                };
                if !same {
                    return Err(unsupported(key, &format!("set to {x}")));
                }
            }
        }
        let block_out_channels: Vec<usize> = v
            .get("block_out_channels")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect())
            .ok_or_else(|| {
                Error::Config("unet config: block_out_channels must be a list of integers".into())
            })?;
        let n = block_out_channels.len();
        if n == 0 {
            return Err(Error::Config(
                "unet config: block_out_channels is empty".into(),
            ));
        }
        let down_block_types = strings(v, "down_block_types")?;
        let up_block_types = strings(v, "up_block_types")?;
        for (key, types, known) in [
            ("down_block_types", &down_block_types, &DOWN_TYPES),
            ("up_block_types", &up_block_types, &UP_TYPES),
        ] {
            if types.len() != n {
                return Err(Error::Config(format!(
                    "unet config: {key} has {} entries, block_out_channels {n}",
                    types.len()
                )));
            }
            if let Some(t) = types.iter().find(|t| !known.contains(&t.as_str())) {
                return Err(unsupported(key, &format!("block type {t}")));
            }
        }
        let heads = match per_block(v, "num_attention_heads", n)? {
            Some(h) => h,
            None => per_block(v, "attention_head_dim", n)?.unwrap_or(vec![8; n]),
        };
        for (i, (&c, &h)) in block_out_channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                return Err(Error::Config(format!(
                    "unet config: block {i} has {c} channels, not divisible into {h} heads"
                )));
            }
        }
        let norm_num_groups = field_usize(v, "norm_num_groups")?.unwrap_or(32);
        if let Some(c) = block_out_channels
            .iter()
            .find(|&&c| c % norm_num_groups != 0)
        {
            return Err(Error::Config(format!(
                "unet config: norm_num_groups {norm_num_groups} does not divide {c} channels"
            )));
        }
        let cross_attention_dim = match v.get("cross_attention_dim") {
            Some(Value::Array(_)) => {
                return Err(unsupported("cross_attention_dim", "a list"));
            }
            _ => field_usize(v, "cross_attention_dim")?.unwrap_or(1280),
        };
        let f = |key: &str, d: f64| v.get(key).and_then(Value::as_f64).unwrap_or(d);
        let b = |key: &str, d: bool| v.get(key).and_then(Value::as_bool).unwrap_or(d);
        Ok(UNetConfig {
            in_channels: field_usize(v, "in_channels")?.unwrap_or(4),
            out_channels: field_usize(v, "out_channels")?.unwrap_or(4),
            block_out_channels,
            down_block_types,
            up_block_types,
            heads,
            cross_attention_dim,
            norm_num_groups,
            norm_eps: f("norm_eps", 1e-5),
            use_linear_projection: b("use_linear_projection", false),
            flip_sin_to_cos: b("flip_sin_to_cos", true),
            freq_shift: f("freq_shift", 0.0),
            sample_size: field_usize(v, "sample_size")?.unwrap_or(64),
        })
    }
}

struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(t: &mut Take, path: &str, heads: usize) -> Result<Self> {
        Ok(Attention {
            to_q: t.linear(&format!("{path}.to_q"), false)?,
            to_k: t.linear(&format!("{path}.to_k"), false)?,
            to_v: t.linear(&format!("{path}.to_v"), false)?,
            to_out: t.linear(&format!("{path}.to_out.0"), true)?,
            heads,
        })
    }

    /// `x` is `(b, n, c)`; `context` `(b, m, c_ctx)`, or `None` for self-attention.
    fn forward(&self, x: &Tensor, context: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Tensor> {
        let kv = context.unwrap_or(x);
        let q = linear_nd(&self.to_q, x, ctx)?;
        let k = linear_nd(&self.to_k, kv, ctx)?;
        let v = linear_nd(&self.to_v, kv, ctx)?;
        let o = attention(&q, &k, &v, self.heads, None)?;
        linear_nd(&self.to_out, &o, ctx)
    }
}

struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    /// GEGLU's projection to twice the hidden width: `ff.net.0.proj`.
    ff_in: Linear,
    /// `ff.net.2`.
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(t: &mut Take, path: &str, heads: usize) -> Result<Self> {
        Ok(TransformerBlock {
            norm1: t.layer_norm(&format!("{path}.norm1"), 1e-5)?,
            attn1: Attention::load(t, &format!("{path}.attn1"), heads)?,
            norm2: t.layer_norm(&format!("{path}.norm2"), 1e-5)?,
            attn2: Attention::load(t, &format!("{path}.attn2"), heads)?,
            norm3: t.layer_norm(&format!("{path}.norm3"), 1e-5)?,
            ff_in: t.linear(&format!("{path}.ff.net.0.proj"), true)?,
            ff_out: t.linear(&format!("{path}.ff.net.2"), true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None, ctx)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context), ctx)?
            + &x)?;
        let h = linear_nd(&self.ff_in, &self.norm3.forward(&x)?, ctx)?;
        let h = crate::ops::geglu(&h)?;
        Ok((linear_nd(&self.ff_out, &h, ctx)? + x)?)
    }
}

/// `proj_in` / `proj_out` are 1×1 convolutions in SD 1.x and linear layers in SD 2.x
/// (`use_linear_projection`); either way the same map per pixel, so both are linear
/// layers on the tokens here (and both can take LoRA), the convolutions marked as such
/// for the adapter files.
struct Transformer2D {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    fn load(t: &mut Take, path: &str, heads: usize, cfg: &UNetConfig) -> Result<Self> {
        let proj = |t: &mut Take, name: &str| -> Result<Linear> {
            let p = format!("{path}.{name}");
            let mut l = t.linear(&p, true)?;
            if !cfg.use_linear_projection {
                let d = l.weight.dims();
                if d.len() != 4 || d[2] != 1 || d[3] != 1 {
                    return Err(Error::Model(format!(
                        "unet: {p}.weight has shape {d:?}, a 1x1 convolution expected"
                    )));
                }
                l.weight = l.weight.dense()?.reshape((d[0], d[1]))?.into();
                l.conv1x1 = true;
            }
            Ok(l)
        };
        let norm = t.group_norm(&format!("{path}.norm"), cfg.norm_num_groups, 1e-6)?;
        let proj_in = proj(t, "proj_in")?;
        let mut blocks = Vec::new();
        while t.has(&format!(
            "{path}.transformer_blocks.{}.norm1.weight",
            blocks.len()
        )) {
            let p = format!("{path}.transformer_blocks.{}", blocks.len());
            blocks.push(TransformerBlock::load(t, &p, heads)?);
        }
        if blocks.is_empty() {
            return Err(Error::Model(format!(
                "unet: missing weight {path}.transformer_blocks.0.norm1.weight"
            )));
        }
        let proj_out = proj(t, "proj_out")?;
        Ok(Transformer2D {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = |t: Tensor| -> Result<Tensor> {
            let c = t.dim(1)?;
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)
        };
        let y = self.norm.forward(x)?;
        let mut y = linear_nd(&self.proj_in, &tokens(y)?, ctx)?;
        for blk in &self.blocks {
            y = blk.forward(&y, context, ctx)?;
        }
        let y = linear_nd(&self.proj_out, &y, ctx)?
            .reshape((b, h, w, ()))?
            .permute((0, 3, 1, 2))?
            .contiguous()?;
        debug_assert_eq!(y.dim(1).ok(), Some(c));
        Ok((y + x)?)
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    downsample: Option<Conv>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock>,
    attentions: Vec<Transformer2D>,
    upsample: Option<Conv>,
}

/// Nearest-neighbour 2× upsampling as a broadcast, whose backward (a sum) candle gets
/// right; its `upsample_nearest2d` overwrites accumulated gradients.
fn upsample2x(x: &Tensor) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    Ok(x.reshape((b, c, h, 1, w, 1))?
        .broadcast_as((b, c, h, 2, w, 2))?
        .reshape((b, c, 2 * h, 2 * w))?)
}

/// The UNet, with LoRA-capable linear layers.
pub struct UNet {
    pub cfg: UNetConfig,
    conv_in: Conv,
    time_linear_1: Linear,
    time_linear_2: Linear,
    down: Vec<DownBlock>,
    mid_resnets: Vec<ResnetBlock>,
    mid_attention: Transformer2D,
    up: Vec<UpBlock>,
    norm_out: GroupNorm,
    conv_out: Conv,
    device: Device,
}

impl UNet {
    /// Loads `dir` (a diffusers `unet/` folder: `config.json` and safetensors in any
    /// float dtype, computed in f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg = UNetConfig::from_diffusers_json(&crate::io::read_json(&cfg_path)?)?;
        let weights = read_safetensors_f32(dir, device)?;
        Self::new(cfg, weights, device)
    }

    pub fn new(cfg: UNetConfig, mut weights: Weights, device: &Device) -> Result<Self> {
        let t = &mut Take::new(&mut weights, "unet");
        let n = cfg.block_out_channels.len();
        let mut down = Vec::new();
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let cross = kind == "CrossAttnDownBlock2D";
            let mut blk = DownBlock {
                resnets: Vec::new(),
                attentions: Vec::new(),
                downsample: None,
            };
            for j in 0.. {
                let p = format!("down_blocks.{i}.resnets.{j}");
                if !t.has(&format!("{p}.conv1.weight")) {
                    break;
                }
                blk.resnets
                    .push(ResnetBlock::load(t, &p, cfg.norm_num_groups, cfg.norm_eps)?);
                if cross {
                    let p = format!("down_blocks.{i}.attentions.{j}");
                    blk.attentions
                        .push(Transformer2D::load(t, &p, cfg.heads[i], &cfg)?);
                }
            }
            if blk.resnets.is_empty() {
                return Err(Error::Model(format!(
                    "unet: missing weight down_blocks.{i}.resnets.0.conv1.weight"
                )));
            }
            if i + 1 < n {
                blk.downsample = Some(t.conv(&format!("down_blocks.{i}.downsamplers.0.conv"), 2)?);
            }
            down.push(blk);
        }
        let mid_resnets = vec![
            ResnetBlock::load(t, "mid_block.resnets.0", cfg.norm_num_groups, cfg.norm_eps)?,
            ResnetBlock::load(t, "mid_block.resnets.1", cfg.norm_num_groups, cfg.norm_eps)?,
        ];
        let mid_attention =
            Transformer2D::load(t, "mid_block.attentions.0", cfg.heads[n - 1], &cfg)?;
        let mut up = Vec::new();
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let cross = kind == "CrossAttnUpBlock2D";
            let heads = cfg.heads[n - 1 - i];
            let mut blk = UpBlock {
                resnets: Vec::new(),
                attentions: Vec::new(),
                upsample: None,
            };
            for j in 0.. {
                let p = format!("up_blocks.{i}.resnets.{j}");
                if !t.has(&format!("{p}.conv1.weight")) {
                    break;
                }
                blk.resnets
                    .push(ResnetBlock::load(t, &p, cfg.norm_num_groups, cfg.norm_eps)?);
                if cross {
                    let p = format!("up_blocks.{i}.attentions.{j}");
                    blk.attentions
                        .push(Transformer2D::load(t, &p, heads, &cfg)?);
                }
            }
            if blk.resnets.is_empty() {
                return Err(Error::Model(format!(
                    "unet: missing weight up_blocks.{i}.resnets.0.conv1.weight"
                )));
            }
            if i + 1 < n {
                blk.upsample = Some(t.conv(&format!("up_blocks.{i}.upsamplers.0.conv"), 1)?);
            }
            up.push(blk);
        }
        let unet = UNet {
            conv_in: t.conv("conv_in", 1)?,
            time_linear_1: t.linear("time_embedding.linear_1", true)?,
            time_linear_2: t.linear("time_embedding.linear_2", true)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            norm_out: t.group_norm("conv_norm_out", cfg.norm_num_groups, cfg.norm_eps)?,
            conv_out: t.conv("conv_out", 1)?,
            device: device.clone(),
            cfg,
        };
        let skips: usize = unet
            .down
            .iter()
            .map(|b| b.resnets.len() + usize::from(b.downsample.is_some()))
            .sum::<usize>()
            + 1;
        let pops: usize = unet.up.iter().map(|b| b.resnets.len()).sum();
        if skips != pops {
            return Err(Error::Model(format!(
                "unet: the down blocks keep {skips} skip connections but the up blocks take {pops}"
            )));
        }
        if let Some(k) = weights.keys().min() {
            return Err(Error::Model(format!(
                "unet: unexpected weight {k} ({} unused in all)",
                weights.len()
            )));
        }
        Ok(unet)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The sinusoidal embedding of per-sample timesteps, as diffusers'
    /// `get_timestep_embedding` computes it (in f32).
    fn time_proj(&self, timesteps: &[f32]) -> Result<Tensor> {
        let dim = self.cfg.block_out_channels[0];
        let half = dim / 2;
        let denom = half as f32 - self.cfg.freq_shift as f32;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f32.ln()) * i as f32 / denom).exp())
            .collect();
        let mut out = Vec::with_capacity(timesteps.len() * dim);
        for &t in timesteps {
            let args = freqs.iter().map(|f| t * f);
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.map(|a| (a.sin(), a.cos())).unzip();
            if self.cfg.flip_sin_to_cos {
                out.extend(cos);
                out.extend(sin);
            } else {
                out.extend(sin);
                out.extend(cos);
            }
        }
        Ok(Tensor::from_vec(out, (timesteps.len(), dim), &self.device)?)
    }

    /// Predicts noise (or velocity) for `sample` `(b, in, h, w)` at per-sample
    /// `timesteps` under `context` `(b, tokens, cross_attention_dim)`.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &[f32],
        context: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (b, _, h, w) = sample.dims4()?;
        if timesteps.len() != b {
            return Err(Error::Model(format!(
                "unet: {} timesteps for a batch of {b}",
                timesteps.len()
            )));
        }
        let factor = 1usize << (self.down.len() - 1);
        if h % factor != 0 || w % factor != 0 {
            return Err(Error::Model(format!(
                "unet: latents of {h}x{w} are not divisible by {factor}"
            )));
        }
        let temb = self.time_proj(timesteps)?;
        let temb = self.time_linear_1.forward(&temb, ctx)?.silu()?;
        let temb = self.time_linear_2.forward(&temb, ctx)?;
        let temb_act = temb.silu()?;

        let mut x = self.conv_in.forward(sample, ctx)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&temb_act), ctx)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(d) = &blk.downsample {
                x = d.forward(&x, ctx)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, Some(&temb_act), ctx)?;
        x = self.mid_attention.forward(&x, context, ctx)?;
        x = self.mid_resnets[1].forward(&x, Some(&temb_act), ctx)?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips.pop().expect("counted at load");
                x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&temb_act), ctx)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, ctx)?;
                }
            }
            if let Some(u) = &blk.upsample {
                x = u.forward(&upsample2x(&x)?, ctx)?;
            }
        }
        let x = self.norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x, ctx)
    }

    /// Every resnet, in diffusers' module order (down, mid, up).
    fn resnets(&self) -> Vec<&ResnetBlock> {
        let mut out: Vec<&ResnetBlock> = Vec::new();
        for b in &self.down {
            out.extend(&b.resnets);
        }
        out.extend(&self.mid_resnets);
        for b in &self.up {
            out.extend(&b.resnets);
        }
        out
    }

    /// The attention blocks and the resnets, each in diffusers' module order, borrowed
    /// together.
    fn blocks_mut(&mut self) -> (Vec<&mut Transformer2D>, Vec<&mut ResnetBlock>) {
        let (mut trs, mut res) = (Vec::new(), Vec::new());
        for b in &mut self.down {
            trs.extend(&mut b.attentions);
            res.extend(&mut b.resnets);
        }
        trs.push(&mut self.mid_attention);
        res.extend(&mut self.mid_resnets);
        for b in &mut self.up {
            trs.extend(&mut b.attentions);
            res.extend(&mut b.resnets);
        }
        (trs, res)
    }

    fn transformers(&self) -> Vec<&Transformer2D> {
        let mut out: Vec<&Transformer2D> = Vec::new();
        for b in &self.down {
            out.extend(&b.attentions);
        }
        out.push(&self.mid_attention);
        for b in &self.up {
            out.extend(&b.attentions);
        }
        out
    }
}

impl LoraModel for UNet {
    /// The linear layers of the attention blocks, in diffusers' module order (down, mid,
    /// up): the ones SD LoRA recipes target (`to_q`, `to_k`, `to_v`, `to_out.0`, the
    /// feed-forward, and `proj_in`/`proj_out`); then the resnets' `time_emb_proj`.
    fn linears_mut(&mut self) -> Vec<(&mut Linear, bool)> {
        let mut out: Vec<(&mut Linear, bool)> = Vec::new();
        let (transformers, resnets) = self.blocks_mut();
        for tr in transformers {
            out.push((&mut tr.proj_in, false));
            for b in &mut tr.blocks {
                for a in [&mut b.attn1, &mut b.attn2] {
                    out.extend([
                        (&mut a.to_q, false),
                        (&mut a.to_k, false),
                        (&mut a.to_v, false),
                        (&mut a.to_out, false),
                    ]);
                }
                out.push((&mut b.ff_in, false));
                out.push((&mut b.ff_out, false));
            }
            out.push((&mut tr.proj_out, false));
        }
        // Then the resnets' timestep projections (kohya's LoCon set), after the attention
        // blocks' so that the order of everything before them stays as it was.
        for r in resnets {
            out.extend(r.time_emb_proj_mut().map(|l| (l, false)));
        }
        out
    }

    fn linears(&self) -> Vec<&Linear> {
        let mut out: Vec<&Linear> = Vec::new();
        for tr in self.transformers() {
            out.push(&tr.proj_in);
            for b in &tr.blocks {
                for a in [&b.attn1, &b.attn2] {
                    out.extend([&a.to_q, &a.to_k, &a.to_v, &a.to_out]);
                }
                out.extend([&b.ff_in, &b.ff_out]);
            }
            out.push(&tr.proj_out);
        }
        for r in self.resnets() {
            out.extend(r.time_emb_proj());
        }
        out
    }

    /// Every convolution, in diffusers' module order: `conv_in`, each down block's
    /// resnets then its downsampler, the mid block's resnets, each up block's resnets then
    /// its upsampler, `conv_out`. LoCon targets the resnets' and samplers' by name.
    fn convs_mut(&mut self) -> Vec<&mut Conv> {
        let mut out: Vec<&mut Conv> = vec![&mut self.conv_in];
        for b in &mut self.down {
            for r in &mut b.resnets {
                out.extend(r.convs_mut());
            }
            out.extend(&mut b.downsample);
        }
        for r in &mut self.mid_resnets {
            out.extend(r.convs_mut());
        }
        for b in &mut self.up {
            for r in &mut b.resnets {
                out.extend(r.convs_mut());
            }
            out.extend(&mut b.upsample);
        }
        out.push(&mut self.conv_out);
        out
    }

    fn convs(&self) -> Vec<&Conv> {
        let mut out: Vec<&Conv> = vec![&self.conv_in];
        for b in &self.down {
            for r in &b.resnets {
                out.extend(r.convs());
            }
            out.extend(&b.downsample);
        }
        for r in &self.mid_resnets {
            out.extend(r.convs());
        }
        for b in &self.up {
            for r in &b.resnets {
                out.extend(r.convs());
            }
            out.extend(&b.upsample);
        }
        out.push(&self.conv_out);
        out
    }

    fn task_type(&self) -> &'static str {
        // PEFT records no task type for diffusers models.
        ""
    }
}

/// Mean squared error over every element, as `F.mse_loss(pred, target)`.
pub fn mse(pred: &Tensor, target: &Tensor) -> Result<Tensor> {
    Ok((pred - target)?.sqr()?.mean_all()?)
}
