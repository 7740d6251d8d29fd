//! The device-generic twins of the fused CPU ops: the frozen linear layer, RMSNorm, the
//! rotary embedding and the LM head's loss, each with its own backward, written with candle tensor ops so that
//! CUDA (and any device, any dtype) runs them, and each keeping what its fused twin
//! keeps rather than what candle's derived backward would.
//!
//! A custom op's forward gets raw storage, which tensor ops cannot take. So each op here
//! computes its result on detached inputs first, and a [`Handover`] makes that result the
//! custom op's output: the graph then holds only the op's inputs and the backward below.

use super::{rms_norm_primitive, rope_primitive, Frozen};
use candle_core::backend::BackendStorage;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor, D,
};
use std::sync::Mutex;

/// A result computed before its op enters the graph, given to the op's forward once (so
/// the op, which the graph keeps until backward, does not keep a second copy).
pub(super) struct Handover(Mutex<Option<Tensor>>);

impl Handover {
    pub(super) fn new(out: Tensor) -> Self {
        Self(Mutex::new(Some(out)))
    }

    fn take(&self) -> Result<Tensor> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .ok_or_else(|| candle_core::Error::Msg("a handed-over result, taken twice".into()))
    }

    pub(super) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let out = self.take()?;
        let (s, l) = out.storage_and_layout();
        match &*s {
            Storage::Cpu(c) => Ok((c.try_clone(l)?, out.shape().clone())),
            _ => candle_core::bail!("a handed-over result is not on the CPU"),
        }
    }

    #[cfg(feature = "cuda")]
    pub(super) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let out = self.take()?;
        let (s, l) = out.storage_and_layout();
        match &*s {
            Storage::Cuda(c) => Ok((c.try_clone(l)?, out.shape().clone())),
            _ => candle_core::bail!("a handed-over result is not on the GPU"),
        }
    }
}

/// Implements a custom op's forwards (CPU, and CUDA when built with it) as the hand-over.
macro_rules! hand_over_forwards {
    (1) => {
        fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
    (2) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
    (3) => {
        fn cpu_fwd(
            &self,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
            _: &CpuStorage,
            _: &Layout,
        ) -> Result<(CpuStorage, Shape)> {
            self.out.cpu()
        }
        #[cfg(feature = "cuda")]
        fn cuda_fwd(
            &self,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
            _: &candle_core::CudaStorage,
            _: &Layout,
        ) -> Result<(candle_core::CudaStorage, Shape)> {
            self.out.cuda()
        }
    };
}
pub(super) use hand_over_forwards;

/// `x · Wᵀ` for a frozen `W` on any device: the backward computes `dX = g · W` only.
/// (candle's own matmul backward also computes, and keeps until the step ends, a
/// gradient for `W` that nobody reads: a second copy of every frozen weight.)
pub fn frozen_linear_generic(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    let out = x.detach().matmul(&w.dense()?.t()?)?;
    x.apply_op1(FrozenLinear {
        w: w.clone(),
        out: Handover::new(out),
    })
}

struct FrozenLinear {
    w: Frozen,
    out: Handover,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-generic"
    }

    hand_over_forwards!(1);

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.detach().matmul(&self.w.dense()?)?))
    }
}

/// RMSNorm `x · rsqrt(mean(x²) + eps) · w`, normalised in f32, on any device; the graph
/// keeps `x` and `w` only.
pub fn rms_norm_generic(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let out = rms_norm_primitive(&x.detach(), &w.detach(), eps)?;
    x.apply_op2(
        w,
        RmsNorm {
            eps,
            out: Handover::new(out),
        },
    )
}

struct RmsNorm {
    eps: f64,
    out: Handover,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-generic"
    }

    hand_over_forwards!(2);

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // y = x̂·w with x̂ = x·r, r = rsqrt(mean(x²) + eps):
        // dx = r·(g·w − x̂·mean(g·w·x̂)), dw = Σ_rows g·x̂.
        let dtype = x.dtype();
        let (x, w, g) = (
            x.detach().to_dtype(DType::F32)?,
            w.detach().to_dtype(DType::F32)?,
            g.detach().to_dtype(DType::F32)?,
        );
        let r = (x.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?
            .sqrt()?
            .recip()?;
        let xh = x.broadcast_mul(&r)?;
        let gw = g.broadcast_mul(&w)?;
        let m = (&gw * &xh)?.mean_keepdim(D::Minus1)?;
        let dx = (gw - xh.broadcast_mul(&m)?)?.broadcast_mul(&r)?;
        let d = w.elem_count();
        let dw = (g * xh)?.reshape(((), d))?.sum(0)?;
        Ok((Some(dx.to_dtype(dtype)?), Some(dw.to_dtype(dtype)?)))
    }
}

/// The rotary embedding on any device (HF's half-split layout, `x` `(b, h, t, d)`,
/// `cos`/`sin` `(t, d/2)` or `(b, 1, t, d/2)`); its backward is the rotation by the opposite angle.
pub fn rope_generic(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let out = rope_primitive(&x.detach(), cos, sin)?;
    x.apply_op1(Rope {
        cos: cos.clone(),
        sin: sin.clone(),
        out: Handover::new(out),
    })
}

struct Rope {
    cos: Tensor,
    sin: Tensor,
    out: Handover,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-generic"
    }

    hand_over_forwards!(1);

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(rope_primitive(
            &g.detach(),
            &self.cos,
            &self.sin.neg()?,
        )?))
    }
}

/// Rows of logits alive at once on the generic path: the fused op's block.
const HEAD_BLOCK: usize = 128;

/// [`super::projected_nll`] on any device: per-row NLL of `h · Wᵀ` for a frozen `W`,
/// with the logits alive one block of rows at a time and `h`'s gradient prepared in the
/// forward pass (`(softmax − onehot)·W = softmax·W − W[target]`), so the backward only
/// scales it. Logits are taken in f32.
pub fn projected_nll_generic(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    train: bool,
) -> Result<Tensor> {
    super::head_loss::check_head_args(h, w.dims2()?, targets)?;
    let n = h.dim(0)?;
    let dev = h.device();
    let hd = h.detach();
    let mut nll = Vec::new();
    let mut grad = Vec::new();
    for start in (0..n).step_by(HEAD_BLOCK) {
        let c = HEAD_BLOCK.min(n - start);
        let hb = hd.narrow(0, start, c)?;
        let tg = Tensor::from_slice(&targets[start..start + c], c, dev)?;
        let logits = hb.matmul(&w.t()?)?.to_dtype(DType::F32)?;
        let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
        nll.push(lp.gather(&tg.unsqueeze(1)?, 1)?.squeeze(1)?.neg()?);
        if train {
            let p = lp.exp()?.to_dtype(w.dtype())?;
            grad.push((p.matmul(w)? - w.index_select(&tg, 0)?)?);
        }
    }
    let nll = Tensor::cat(&nll, 0)?;
    if !train {
        return Ok(nll);
    }
    let dh = Tensor::cat(&grad, 0)?;
    h.apply_op1(ProjectedNll {
        dh: Mutex::new(Some(dh)),
        out: Handover::new(nll),
    })
}

/// [`projected_nll_generic`] for a frozen output matrix that is expanded a block of
/// vocabulary rows at a time (each block about `block_elems` values), never whole: a
/// packed base's head in f32 is its largest expansion (1.5 GiB for Llama 3.2 3B's
/// 128,256 × 3,072). A first pass over the blocks merges each row's log-sum-exp and
/// picks its target's logit; a second expands them again for the gradient,
/// `Σ_blocks softmax_block · W_block − W[target]`. Equal to the whole-matrix loss up to
/// f32 rounding (the log-sum-exp is merged block by block, the products summed in
/// another order): 1e-6 relative at 32 features, 1.4e-6 at 2,048 in the unit test.
pub fn projected_nll_vocab_blocks(
    h: &Tensor,
    w: &Frozen,
    targets: &[u32],
    train: bool,
    block_elems: usize,
) -> Result<Tensor> {
    super::head_loss::check_head_args(h, w.dims2()?, targets)?;
    let n = h.dim(0)?;
    let dev = h.device();
    let hd = h.detach();
    let blocks = w.row_blocks(block_elems)?;
    let tg = Tensor::from_slice(targets, n, dev)?;
    let mut lse: Option<Tensor> = None;
    let mut target_logit = Tensor::zeros(n, DType::F32, dev)?;
    for r in &blocks {
        let wb = w.expand_rows(r.clone())?;
        let logits = hd.matmul(&wb.t()?)?.to_dtype(DType::F32)?;
        let b = logits.log_sum_exp(D::Minus1)?;
        lse = Some(match lse {
            None => b,
            // log(e^a + e^b), from the larger of the two.
            Some(a) => {
                let m = a.maximum(&b)?;
                let sum = ((&a - &m)?.exp()? + (&b - &m)?.exp()?)?;
                (m + sum.log()?)?
            }
        });
        // Rows whose target lies in this block take its logit; the others add zero.
        let inside: Vec<f32> = targets
            .iter()
            .map(|&t| f32::from(r.contains(&(t as usize)) as u8))
            .collect();
        let local: Vec<u32> = targets
            .iter()
            .map(|&t| (t as usize).clamp(r.start, r.end - 1) as u32 - r.start as u32)
            .collect();
        let local = Tensor::from_vec(local, (n, 1), dev)?;
        let picked = logits.gather(&local, 1)?.squeeze(1)?;
        target_logit = (target_logit + (picked * Tensor::from_vec(inside, n, dev)?)?)?;
    }
    let lse = lse.ok_or_else(|| candle_core::Error::Msg("projected nll: no rows".into()))?;
    let nll = (&lse - target_logit)?;
    if !train {
        return Ok(nll);
    }
    let mut dh = w.rows(&tg)?.to_dtype(DType::F32)?.neg()?;
    let lse_col = lse.unsqueeze(1)?;
    for r in &blocks {
        let wb = w.expand_rows(r.clone())?;
        let logits = hd.matmul(&wb.t()?)?.to_dtype(DType::F32)?;
        let p = logits
            .broadcast_sub(&lse_col)?
            .exp()?
            .to_dtype(wb.dtype())?;
        dh = (dh + p.matmul(&wb)?.to_dtype(DType::F32)?)?;
    }
    h.apply_op1(ProjectedNll {
        dh: Mutex::new(Some(dh)),
        out: Handover::new(nll),
    })
}

struct ProjectedNll {
    /// `(softmax − onehot) · W` per row, from the forward pass for the backward one.
    dh: Mutex<Option<Tensor>>,
    out: Handover,
}

impl CustomOp1 for ProjectedNll {
    fn name(&self) -> &'static str {
        "projected-nll-generic"
    }

    hand_over_forwards!(1);

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(dh) = self.dh.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("projected nll: a second backward pass")
        };
        let g = g.detach().to_dtype(dh.dtype())?.unsqueeze(1)?;
        Ok(Some(dh.broadcast_mul(&g)?.to_dtype(h.dtype())?))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{agree, rand_vec};
    use super::super::{projected_nll, RopeTables};
    use super::*;
    use candle_core::Device;

    /// Blocks of 3 and of 4 vocabulary rows of a dense matrix (the last shorter), and the
    /// two parts of a packed one, give the whole-matrix loss and gradient.
    #[test]
    fn vocab_blocks_give_the_whole_matrix_loss_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, v) = (9, 32, 11usize);
        let w = (Tensor::from_vec(rand_vec(v * d, 51), (v, d), &dev)? * 2.0)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let h = rand_vec(n * d, 52);
        let whole = |h: &Tensor| projected_nll(h, &w, &targets, true);
        let wf = Frozen::from(w.clone());
        for rows in [3, 4] {
            let blocked = |h: &Tensor| projected_nll_vocab_blocks(h, &wf, &targets, true, rows * d);
            let e = agree(&blocked, &whole, h.clone(), &[n, d])?;
            assert!(e < 1e-6, "blocks of {rows} rows: {e:.3e}");
        }
        let ht = Tensor::from_vec(h, (n, d), &dev)?;
        let a = projected_nll_vocab_blocks(&ht, &wf, &targets, false, 2 * d)?;
        let diff = (a - whole(&ht)?)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");

        // Packed: 600 rows of 2,048 are two parts (512 and 88 rows), one block each;
        // against the loss over its own whole expansion.
        let (n, d, v) = (4, 2048, 600usize);
        let w = Tensor::from_vec(rand_vec(v * d, 53), (v, d), &dev)?;
        let packed = Frozen::pack(&w, candle_core::quantized::GgmlDType::Q8_0)?;
        assert_eq!(packed.row_blocks(1)?, vec![0..512, 512..600]);
        let wd = packed.dense()?;
        let targets: Vec<u32> = vec![3, 599, 511, 512];
        let whole = |h: &Tensor| projected_nll(h, &wd, &targets, true);
        let blocked = |h: &Tensor| projected_nll_vocab_blocks(h, &packed, &targets, true, 1);
        // 2,048-long dot products summed in another order: f32 rounding, 1.4e-6 here.
        let e = agree(&blocked, &whole, rand_vec(n * d, 54), &[n, d])?;
        assert!(e < 5e-6, "packed: {e:.3e}");
        Ok(())
    }

    #[test]
    fn generic_frozen_linear_matches_the_fused_op_and_leaves_the_weight_alone() -> Result<()> {
        let dev = Device::Cpu;
        let (n, i, o) = (5, 6, 7);
        let w = Tensor::from_vec(rand_vec(o * i, 87), (o, i), &dev)?;
        let wf = Frozen::from(w.clone());
        let generic = |x: &Tensor| frozen_linear_generic(x, &wf);
        let fused = |x: &Tensor| {
            x.apply_op1(super::super::FrozenLinear {
                w: wf.clone(),
                bias: None,
            })
        };
        assert!(agree(&generic, &fused, rand_vec(n * i, 88), &[n, i])? < 1e-5);
        // Even a weight that is a variable gets no gradient: it is frozen by contract.
        let wv = candle_core::Var::from_tensor(&w)?;
        let x =
            candle_core::Var::from_tensor(&Tensor::from_vec(rand_vec(n * i, 88), (n, i), &dev)?)?;
        let grads = frozen_linear_generic(x.as_tensor(), &Frozen::from(wv.as_tensor().clone()))?
            .sum_all()?
            .backward()?;
        assert!(grads.get(wv.as_tensor()).is_none());
        assert!(grads.get(x.as_tensor()).is_some());
        Ok(())
    }

    #[test]
    fn generic_rms_norm_matches_the_fused_op_in_values_and_both_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d) = (5, 8);
        let w = Tensor::from_vec(rand_vec(d, 81), d, &dev)?;
        let x = rand_vec(n * d, 82);
        let generic = |x: &Tensor| rms_norm_generic(x, &w, 1e-5);
        let fused = |x: &Tensor| x.apply_op2(&w, super::super::RmsNorm { eps: 1e-5 });
        assert!(agree(&generic, &fused, x.clone(), &[n, d])? < 1e-5);
        // The weight's gradient too (frozen in LoRA, but the op must not lie about it).
        let xt = Tensor::from_vec(x, (n, d), &dev)?;
        let generic = |w: &Tensor| rms_norm_generic(&xt, w, 1e-5);
        let fused = |w: &Tensor| xt.apply_op2(w, super::super::RmsNorm { eps: 1e-5 });
        assert!(agree(&generic, &fused, rand_vec(d, 81), &[d])? < 1e-5);
        Ok(())
    }

    #[test]
    fn generic_rope_matches_the_fused_op_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, t, d) = (2, 3, 5, 4);
        let ang = (Tensor::from_vec(rand_vec(t * d / 2, 83), (t, d / 2), &dev)? * 3.0)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let generic = |x: &Tensor| rope_generic(x, &cos, &sin);
        let fused = |x: &Tensor| {
            x.contiguous()?.apply_op1(super::super::Rope {
                tables: RopeTables::new(&cos, &sin)?,
                sign: 1.0,
            })
        };
        assert!(agree(&generic, &fused, rand_vec(b * h * t * d, 84), &[b, h, t, d])? < 1e-5);
        Ok(())
    }

    #[test]
    fn generic_head_loss_matches_the_fused_op_across_blocks() -> Result<()> {
        let dev = Device::Cpu;
        let (n, d, v) = (HEAD_BLOCK + 5, 6usize, 11usize);
        let w = (Tensor::from_vec(rand_vec(v * d, 85), (v, d), &dev)? * 2.0)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let generic = |h: &Tensor| projected_nll_generic(h, &w, &targets, true);
        let fused = |h: &Tensor| projected_nll(h, &w, &targets, true);
        assert!(agree(&generic, &fused, rand_vec(n * d, 86), &[n, d])? < 1e-5);
        let h = Tensor::from_vec(rand_vec(n * d, 86), (n, d), &dev)?;
        let a = projected_nll_generic(&h, &w, &targets, false)?;
        let b = projected_nll(&h, &w, &targets, false)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        assert!(projected_nll_generic(&h, &w, &targets[1..], true).is_err());
        Ok(())
    }
}
