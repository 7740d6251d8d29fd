//! The conv LoRA layer, as PEFT's `Conv2d` LoRA computes it.
//!
//! `y = conv(x, W) + b + s · B(A(dropout(x)))`: `A` is a convolution into `r` channels
//! with the base's kernel size, stride and padding, `B` a 1×1 convolution back to the
//! base's output channels. A and B are held in the shapes adapter files store them,
//! `[r, in, k, k]` and `[out, r, 1, 1]`. A starts as PEFT's kaiming-uniform (a = √5),
//! U(±1/√(in·k·k)), B as zeros.

use super::{dropout, fresh_pair, ForwardCtx, LoraConfig, LoraPair};
use crate::ops::{conv2d, frozen_conv2d};
use crate::Result;
use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

/// A frozen 2-D convolution (groups 1, square kernel) that may carry a LoRA adapter.
pub struct Conv2d {
    /// PEFT module path, e.g. `down_blocks.0.resnets.0.conv1`.
    pub path: String,
    /// `(out, in, k, k)`.
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
    pub lora: Option<LoraPair>,
}

impl Conv2d {
    pub fn new(
        path: String,
        weight: Tensor,
        bias: Option<Tensor>,
        stride: usize,
        padding: usize,
    ) -> Self {
        Self {
            path,
            weight,
            bias,
            stride,
            padding,
            lora: None,
        }
    }

    pub fn in_channels(&self) -> usize {
        self.weight.dim(1).unwrap_or(0)
    }
    pub fn out_channels(&self) -> usize {
        self.weight.dim(0).unwrap_or(0)
    }
    pub fn kernel_size(&self) -> usize {
        self.weight.dim(2).unwrap_or(0)
    }

    /// The frozen weight and bias in `dtype`; an adapter's weights stay f32.
    pub fn cast_frozen(&mut self, dtype: DType) -> Result<()> {
        self.weight = self.weight.to_dtype(dtype)?;
        if let Some(b) = &self.bias {
            self.bias = Some(b.to_dtype(dtype)?);
        }
        Ok(())
    }

    /// `x` is `(n, in, h, w)`.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut y = frozen_conv2d(x, &self.weight, self.padding, self.stride)?;
        if let Some(b) = &self.bias {
            y = crate::ops::add_frozen(&y, &b.reshape((1, b.elem_count(), 1, 1))?)?;
        }
        let Some(l) = self.lora.as_ref().filter(|_| ctx.adapters) else {
            return Ok(y);
        };
        let xd = if ctx.train && l.dropout > 0.0 {
            dropout(x, l.dropout, &mut ctx.rng.borrow_mut())?
        } else {
            x.clone()
        };
        let a = l.a.as_tensor().to_dtype(x.dtype())?;
        let xa = conv2d(&xd, &a, self.padding, self.stride)?;
        let (n, r, ho, wo) = xa.dims4()?;
        // B, a 1×1 convolution, is one product over the channels of every pixel.
        let b = l.b.as_tensor().reshape((self.out_channels(), r))?;
        let xa = xa.reshape((n, r, ho * wo))?;
        let delta = if x.dtype() == DType::F32 {
            b.broadcast_matmul(&xa)?
        } else {
            // Half precision: the update's second product runs in f32, as the linear
            // layer's does, and the caller rounds once.
            b.broadcast_matmul(&xa.to_dtype(DType::F32)?)?
        };
        let delta = (delta.reshape((n, self.out_channels(), ho, wo))? * l.scale)?;
        Ok((y.to_dtype(delta.dtype())? + delta)?)
    }

    /// Attaches a fresh adapter: A ~ U(±1/√(in·k·k)), B = 0.
    pub fn attach_lora(&mut self, cfg: &LoraConfig, rng: &mut ChaCha8Rng) -> Result<()> {
        let (out, inp, k) = (self.out_channels(), self.in_channels(), self.kernel_size());
        if self.weight.dim(3)? != k {
            return Err(crate::Error::Unsupported(format!(
                "{}: conv LoRA on a non-square {:?} kernel",
                self.path,
                self.weight.dims()
            )));
        }
        let dev = self.weight.device();
        let (a, b) = ((cfg.r, inp, k, k), (out, cfg.r, 1, 1));
        self.lora = Some(fresh_pair(cfg, inp * k * k, a, b, dev, rng)?);
        Ok(())
    }

    /// `W + s · B ⊗ A`: the `(out, r)` product with A as its `(r, in·k·k)` matrix, for
    /// merging (PEFT's `conv2d(A.permute(1, 0, 2, 3), B).permute(1, 0, 2, 3)`).
    pub fn merged_weight(&self) -> Result<Tensor> {
        let Some(l) = &self.lora else {
            return Ok(self.weight.clone());
        };
        let (out, inp, k) = (self.out_channels(), self.in_channels(), self.kernel_size());
        let r = l.a.dim(0)?;
        let delta =
            l.b.as_tensor()
                .reshape((out, r))?
                .matmul(&l.a.as_tensor().reshape((r, inp * k * k))?)?
                .reshape((out, inp, k, k))?;
        Ok((&self.weight + (delta.to_dtype(self.weight.dtype())? * l.scale)?)?)
    }
}
