//! Layers that more than one family builds its models from, on top of `ops`.

use crate::Result;
use candle_core::{Tensor, Var};

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

    /// `forward(a + res)`, a post-norm residual block's, with the sum made inside the op.
    pub fn forward_residual(&self, a: &Tensor, res: &Tensor) -> Result<Tensor> {
        Ok(crate::ops::layer_norm_residual(
            a,
            res,
            &self.weight,
            &self.bias,
            self.eps,
        )?)
    }
}

/// A head layer trained in full (PEFT's `modules_to_save`): a classifier's linear layers.
pub struct FullLinear {
    /// Module path, e.g. `classifier`, `classifier.out_proj` or `classifier.1`.
    pub path: String,
    pub weight: Var,
    pub bias: Var,
}

impl FullLinear {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.matmul(&self.weight.as_tensor().t()?)?
            .broadcast_add(self.bias.as_tensor())?)
    }

    /// Its weight and bias under the names PEFT stores them by.
    pub fn params(&self) -> [(String, Var); 2] {
        [
            (
                format!("base_model.model.{}.weight", self.path),
                self.weight.clone(),
            ),
            (
                format!("base_model.model.{}.bias", self.path),
                self.bias.clone(),
            ),
        ]
    }
}
