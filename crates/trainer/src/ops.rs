//! Differentiable building blocks, and the ops that make frozen weights cheap.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward pass
//! (their gradient silently never arrives), so training graphs use the primitive
//! formulations here. `frozen_linear` skips the weight gradient that candle would
//! otherwise compute, and keep, for every frozen matmul.

use candle_core::{CpuStorage, CustomOp2, DType, Layout, Result, Shape, Tensor, D};

/// Returns `y` as computed, and on the way back only `dX = g · W`.
struct FrozenLinearGrad {
    w: Tensor,
}

impl CustomOp2 for FrozenLinearGrad {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _lx: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        // `y` is a fresh contiguous matmul output at offset 0, so its storage is the result.
        Ok((y.clone(), ly.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(&self.w)?), None))
    }
}

/// `x · Wᵀ` for a 2-D `x` and a frozen `(out, in)` weight, without the weight gradient.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() {
        // The custom op has no device kernel; a plain matmul is correct, only slower.
        return x.matmul(&w.t()?);
    }
    let y = x.detach().matmul(&w.t()?)?.contiguous()?;
    if x.track_op() {
        x.apply_op2(&y, FrozenLinearGrad { w: w.clone() })
    } else {
        Ok(y)
    }
}

/// RMSNorm as transformers computes it: in f32, `x · rsqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    x.to_dtype(dtype)?.broadcast_mul(w)
}

/// Rotary embedding, HF's half-split layout: `x·cos + rotate_half(x)·sin`.
/// `x` is `(b, h, t, d)`; `cos`/`sin` are `(t, d/2)`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, _t, d) = x.dims4()?;
    let half = d / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Softmax over the last dimension from primitives (max-subtracted), in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn frozen_linear_matches_matmul_and_passes_input_grad() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1., (5, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1., (4, 3), &dev)?)?;
        let y1 = frozen_linear(x.as_tensor(), &w)?;
        let y2 = x.as_tensor().matmul(&w.t()?)?;
        let diff = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-6);
        let g1 = y1.sqr()?.sum_all()?.backward()?;
        let g2 = y2.sqr()?.sum_all()?.backward()?;
        let d = (g1.get(x.as_tensor()).unwrap() - g2.get(x.as_tensor()).unwrap())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5);
        // The frozen weight gets no gradient entry.
        assert!(g1.get(&w).is_none());
        Ok(())
    }
}
