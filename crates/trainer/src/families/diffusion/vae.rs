//! The encoder half of diffusers' `AutoencoderKL`, frozen: images to the latent
//! distribution's moments. Training caches the moments (mean and log-variance) once per
//! image and draws each step's latent from them with a seeded RNG, which is why this
//! returns the moments rather than a sample.

use super::layers::{attention, Affine, Conv, GroupNorm, ResnetBlock};
use crate::io::read_safetensors_f32;
use crate::io::Take;
use crate::lora::ForwardCtx;
use crate::{Error, Result};
use candle_core::{Device, Tensor};
use serde_json::Value;
use std::path::Path;

/// diffusers' VAE epsilon for every norm of the encoder.
const EPS: f64 = 1e-6;

struct DownBlock {
    resnets: Vec<ResnetBlock>,
    /// Stride-2 convolution after an asymmetric (0, 1, 0, 1) pad.
    downsample: Option<Conv>,
}

/// The single-head self-attention of the mid block, with its own GroupNorm and residual.
struct MidAttention {
    norm: GroupNorm,
    q: Affine,
    k: Affine,
    v: Affine,
    out: Affine,
}

impl MidAttention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let t = self
            .norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let (q, k, v) = (
            self.q.forward(&t)?,
            self.k.forward(&t)?,
            self.v.forward(&t)?,
        );
        let o = self.out.forward(&attention(&q, &k, &v, 1, None)?)?;
        let o = o.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((o + x)?)
    }
}

/// The VAE's encoder and `quant_conv`, and the latent scaling factor.
pub struct VaeEncoder {
    conv_in: Conv,
    down: Vec<DownBlock>,
    mid_resnets: [ResnetBlock; 2],
    mid_attention: Option<MidAttention>,
    norm_out: GroupNorm,
    conv_out: Conv,
    quant_conv: Option<Conv>,
    /// Latents are `sample × scaling_factor` (0.18215 for SD 1.x/2.x).
    pub scaling_factor: f64,
}

impl VaeEncoder {
    /// Loads a diffusers `vae/` folder's encoder (the decoder's weights are not read).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: Value = crate::io::read_json(&cfg_path)?;
        if cfg.get("shift_factor").is_some_and(|v| !v.is_null()) {
            return Err(Error::Unsupported(
                "vae config: shift_factor (an SD3/FLUX VAE) is not supported yet".into(),
            ));
        }
        if let Some(t) = cfg
            .get("down_block_types")
            .and_then(Value::as_array)
            .and_then(|a| a.iter().find(|t| t.as_str() != Some("DownEncoderBlock2D")))
        {
            return Err(Error::Unsupported(format!(
                "vae config: down block type {t}"
            )));
        }
        let groups = cfg
            .get("norm_num_groups")
            .and_then(Value::as_u64)
            .unwrap_or(32) as usize;
        let scaling_factor = cfg
            .get("scaling_factor")
            .and_then(Value::as_f64)
            .unwrap_or(0.18215);
        let mut weights = read_safetensors_f32(dir, device)?;
        weights.retain(|k, _| k.starts_with("encoder.") || k.starts_with("quant_conv."));
        let t = &mut Take::new(&mut weights, "vae");
        let mut down = Vec::new();
        while t.has(&format!(
            "encoder.down_blocks.{}.resnets.0.conv1.weight",
            down.len()
        )) {
            let i = down.len();
            let mut resnets = Vec::new();
            while t.has(&format!(
                "encoder.down_blocks.{i}.resnets.{}.conv1.weight",
                resnets.len()
            )) {
                let p = format!("encoder.down_blocks.{i}.resnets.{}", resnets.len());
                resnets.push(ResnetBlock::load(t, &p, groups, EPS)?);
            }
            let dp = format!("encoder.down_blocks.{i}.downsamplers.0.conv");
            let downsample = if t.has(&format!("{dp}.weight")) {
                let w = t.get(&format!("{dp}.weight"))?;
                Some(t.conv_with(&dp, w, 2, 0)?)
            } else {
                None
            };
            down.push(DownBlock {
                resnets,
                downsample,
            });
        }
        if down.is_empty() {
            return Err(Error::Model(
                "vae: missing weight encoder.down_blocks.0.resnets.0.conv1.weight".into(),
            ));
        }
        let ap = "encoder.mid_block.attentions.0";
        let mid_attention = if t.has(&format!("{ap}.group_norm.weight")) {
            // Old checkpoints name the projections query/key/value/proj_attn.
            let legacy = t.has(&format!("{ap}.query.weight"));
            let mut pair = |new: &str, old: &str| -> Result<Affine> {
                t.affine(&format!("{ap}.{}", if legacy { old } else { new }))
            };
            let (q, k, v, out) = (
                pair("to_q", "query")?,
                pair("to_k", "key")?,
                pair("to_v", "value")?,
                pair("to_out.0", "proj_attn")?,
            );
            Some(MidAttention {
                norm: t.group_norm(&format!("{ap}.group_norm"), groups, EPS)?,
                q,
                k,
                v,
                out,
            })
        } else {
            None
        };
        let enc = VaeEncoder {
            conv_in: t.conv("encoder.conv_in", 1)?,
            down,
            mid_resnets: [
                ResnetBlock::load(t, "encoder.mid_block.resnets.0", groups, EPS)?,
                ResnetBlock::load(t, "encoder.mid_block.resnets.1", groups, EPS)?,
            ],
            mid_attention,
            norm_out: t.group_norm("encoder.conv_norm_out", groups, EPS)?,
            conv_out: t.conv("encoder.conv_out", 1)?,
            quant_conv: if t.has("quant_conv.weight") {
                Some(t.conv("quant_conv", 1)?)
            } else {
                None
            },
            scaling_factor,
        };
        Ok(enc)
    }

    /// The moments `(mean, logvar)`, each `(b, latent, h/f, w/f)`, of images `(b, 3, h, w)`
    /// in [-1, 1]; logvar is clamped to [-30, 20] as diffusers does.
    pub fn moments(&self, images: &Tensor) -> Result<(Tensor, Tensor)> {
        let ctx = ForwardCtx::eval();
        let mut x = self.conv_in.forward(images, &ctx)?;
        for blk in &self.down {
            for r in &blk.resnets {
                x = r.forward(&x, None, &ctx)?;
            }
            if let Some(d) = &blk.downsample {
                x = d.forward(&x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?, &ctx)?;
            }
        }
        x = self.mid_resnets[0].forward(&x, None, &ctx)?;
        if let Some(a) = &self.mid_attention {
            x = a.forward(&x)?;
        }
        x = self.mid_resnets[1].forward(&x, None, &ctx)?;
        x = self
            .conv_out
            .forward(&self.norm_out.forward_silu(&x)?, &ctx)?;
        if let Some(q) = &self.quant_conv {
            x = q.forward(&x, &ctx)?;
        }
        let c = x.dim(1)? / 2;
        let mean = x.narrow(1, 0, c)?.contiguous()?;
        let logvar = x.narrow(1, c, c)?.clamp(-30f32, 20f32)?.contiguous()?;
        Ok((mean, logvar))
    }
}

/// A latent drawn from cached moments, already scaled: `(mean + exp(logvar/2)·ε)·factor`.
pub fn sample_latent(mean: &Tensor, logvar: &Tensor, eps: &Tensor, factor: f64) -> Result<Tensor> {
    let std = (logvar * 0.5)?.exp()?;
    Ok(((mean + (std * eps)?)? * factor)?)
}
