//! The frozen building blocks the UNet and the VAE share: convolutions, norms and
//! ResNet blocks, composed from candle primitives (whose backward candle derives) where
//! a gradient has to pass through them.

use crate::io::Take;
/// A frozen convolution, differentiated for its input only, which may carry a conv
/// LoRA (the UNet's; the VAE's never do).
pub(crate) use crate::lora::Conv2d as Conv;
use crate::lora::{ForwardCtx, Linear};
pub(crate) use crate::nn::LayerNorm;
use crate::ops::{self, fast_path, multi_head_attention, softmax_last, Heads};
use crate::Result;
use candle_core::{Tensor, D};

/// The frozen layers of the UNet, the VAE and the text encoder, taken by their
/// diffusers path.
impl Take<'_> {
    /// A frozen `path.weight` + `path.bias` pair that never carries an adapter.
    pub(crate) fn affine(&mut self, path: &str) -> Result<Affine> {
        Ok(Affine {
            w: self.get(&format!("{path}.weight"))?,
            b: self.get(&format!("{path}.bias"))?,
        })
    }

    pub(crate) fn linear(&mut self, path: &str, bias: bool) -> Result<Linear> {
        let w = self.get(&format!("{path}.weight"))?;
        let b = if bias {
            Some(self.get(&format!("{path}.bias"))?)
        } else {
            self.get_opt(&format!("{path}.bias"))
        };
        Ok(Linear::new(path.to_string(), w, b))
    }
    /// A convolution padded by half its kernel ("same" at stride 1), as diffusers' are.
    pub(crate) fn conv(&mut self, path: &str, stride: usize) -> Result<Conv> {
        let w = self.get(&format!("{path}.weight"))?;
        let k = w.dim(D::Minus1)?;
        self.conv_with(path, w, stride, k / 2)
    }

    pub(crate) fn conv_with(
        &mut self,
        path: &str,
        w: Tensor,
        stride: usize,
        padding: usize,
    ) -> Result<Conv> {
        let b = self.get(&format!("{path}.bias"))?;
        Ok(Conv::new(path.to_string(), w, Some(b), stride, padding))
    }

    pub(crate) fn group_norm(&mut self, path: &str, groups: usize, eps: f64) -> Result<GroupNorm> {
        Ok(GroupNorm {
            w: self.get(&format!("{path}.weight"))?,
            b: self.get(&format!("{path}.bias"))?,
            groups,
            eps,
        })
    }
    pub(crate) fn layer_norm(&mut self, path: &str, eps: f64) -> Result<LayerNorm> {
        Ok(LayerNorm {
            weight: self.get(&format!("{path}.weight"))?,
            bias: self.get(&format!("{path}.bias"))?,
            eps,
        })
    }
}

/// GroupNorm over `(b, c, h, w)` with frozen weights ([`ops::group_norm`]).
pub(crate) struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm(
            x,
            &self.w,
            &self.b,
            self.groups,
            self.eps,
            false,
        )?)
    }

    /// `silu(forward(x))`, as one op.
    pub(crate) fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        Ok(ops::group_norm(
            x,
            &self.w,
            &self.b,
            self.groups,
            self.eps,
            true,
        )?)
    }
}

/// A frozen linear layer with a bias in the models that are only run, never adapted
/// (the VAE, the text encoder): `x · Wᵀ + b` over the last dimension.
pub(crate) struct Affine {
    w: Tensor,
    b: Tensor,
}

impl Affine {
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.w.t()?)?.broadcast_add(&self.b)?)
    }
}

/// Multi-head scaled dot-product attention: queries `(b, n, heads·d)` against keys and
/// values `(b, m, heads·d)`, with an optional additive mask `(n, m)`; returns
/// `(b, n, heads·d)`. Unmasked on the CPU in f32 it is one op ([`multi_head_attention`]);
/// otherwise composed, with our softmax op (candle's fused one has no backward), so
/// gradients reach every projection either way.
pub(crate) fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let (b, n, inner) = q.dims3()?;
    let m = k.dim(1)?;
    let d = inner / heads;
    if mask.is_none() && [q, k, v].into_iter().all(fast_path) {
        // One op that keeps only q, k and v: the composed form below keeps every layer's
        // (b, heads, n, m) scores and probabilities, 512 MiB a layer at 512 px.
        let g = Heads {
            b,
            t: n,
            tk: m,
            q: heads,
            kv: heads,
            dim: d,
        };
        let rows = |x: &Tensor, len: usize| x.reshape((b * len, inner));
        let out = multi_head_attention(
            &rows(q, n)?,
            &rows(k, m)?,
            &rows(v, m)?,
            g,
            (d as f64).powf(-0.5),
            None,
            None,
        )?;
        return Ok(out.reshape((b, n, inner))?);
    }
    let split = |t: &Tensor, len: usize| -> Result<Tensor> {
        Ok(t.reshape((b, len, heads, d))?
            .transpose(1, 2)?
            .contiguous()?)
    };
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let mut scores = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    if let Some(mask) = mask {
        scores = scores.broadcast_add(mask)?;
    }
    Ok(softmax_last(&scores)?
        .matmul(&v)?
        .transpose(1, 2)?
        .reshape((b, n, inner))?)
}

pub(crate) fn linear_nd(l: &Linear, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (last, lead) = dims.split_last().expect("rank >= 1");
    let rows: usize = lead.iter().product();
    let y = l.forward(&x.reshape((rows, *last))?, ctx)?;
    let mut out = lead.to_vec();
    out.push(y.dim(1)?);
    Ok(y.reshape(out)?)
}

pub(crate) struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv,
    /// The timestep embedding's projection; the VAE's blocks have none.
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv,
    conv_shortcut: Option<Conv>,
}

impl ResnetBlock {
    pub(crate) fn load(t: &mut Take, path: &str, groups: usize, eps: f64) -> Result<Self> {
        let time = format!("{path}.time_emb_proj");
        Ok(ResnetBlock {
            norm1: t.group_norm(&format!("{path}.norm1"), groups, eps)?,
            conv1: t.conv(&format!("{path}.conv1"), 1)?,
            time_emb_proj: if t.has(&format!("{time}.weight")) {
                Some(t.linear(&time, true)?)
            } else {
                None
            },
            norm2: t.group_norm(&format!("{path}.norm2"), groups, eps)?,
            conv2: t.conv(&format!("{path}.conv2"), 1)?,
            conv_shortcut: if t.has(&format!("{path}.conv_shortcut.weight")) {
                Some(t.conv(&format!("{path}.conv_shortcut"), 1)?)
            } else {
                None
            },
        })
    }

    /// The timestep embedding's projection (kohya's LoCon adapts it with the block).
    pub(crate) fn time_emb_proj(&self) -> Option<&Linear> {
        self.time_emb_proj.as_ref()
    }
    pub(crate) fn time_emb_proj_mut(&mut self) -> Option<&mut Linear> {
        self.time_emb_proj.as_mut()
    }

    /// The convolutions, in diffusers' module order (`conv1`, `conv2`, `conv_shortcut`).
    pub(crate) fn convs(&self) -> Vec<&Conv> {
        let mut out = vec![&self.conv1, &self.conv2];
        out.extend(&self.conv_shortcut);
        out
    }
    pub(crate) fn convs_mut(&mut self) -> Vec<&mut Conv> {
        let mut out = vec![&mut self.conv1, &mut self.conv2];
        out.extend(&mut self.conv_shortcut);
        out
    }

    /// `temb_act` is `silu(temb)`, shared by every block; `None` in the VAE.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        temb_act: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward_silu(x)?, ctx)?;
        if let (Some(p), Some(temb)) = (&self.time_emb_proj, temb_act) {
            let t = p.forward(temb, ctx)?.unsqueeze(2)?.unsqueeze(3)?;
            // Untrained, the timestep's projection is a constant here.
            h = ops::add_frozen(&h, &t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?, ctx)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x, ctx)?,
            None => x.clone(),
        };
        Ok((x + h)?)
    }
}
