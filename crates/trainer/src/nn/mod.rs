//! Layers that more than one family builds its models from, on top of `ops`.

use crate::Result;
use candle_core::Tensor;

/// LayerNorm over the last dimension, as transformers and diffusers compute it: one fused
/// op on the CPU in f32 when its weights are frozen (a base model's), candle primitives
/// (whose backward candle derives) otherwise.
pub struct LayerNorm {
    pub weight: Tensor,
    pub bias: Tensor,
    pub eps: f64,
}

impl LayerNorm {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::layer_norm(
            x,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}
