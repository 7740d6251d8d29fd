//! The causal LM's last step, `cross_entropy(h · Wᵀ, targets)` per row for a frozen output
//! matrix `W`, without ever holding the `(n, vocab)` logits.
//!
//! Composed, training keeps the logits until the step ends and builds an equally large
//! gradient on the way back: 2 × 200 MB for 1,024 rows of SmolLM2's 49,152-word vocabulary,
//! the largest single item of a step's peak memory. Here the logits exist one block of rows
//! at a time. The gradient of a row's loss with respect to its hidden state is
//! `(softmax − onehot) · W` times the scalar that flows back into that row, so the forward
//! pass computes the `(n, d)` part while the block's logits are at hand, and the backward
//! only scales it: the same two GEMMs as before, none recomputed.

use super::{matmul_wt, rows_of, vmath};
use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Rows of logits alive at once: 128 × 49,152 × 4 bytes = 25 MB for SmolLM2, and still
/// large enough a GEMM to keep both cores busy.
const BLOCK: usize = 128;

/// Per-row negative log-likelihood of `h · Wᵀ` for `(n, d)` rows `h` and a frozen
/// `(vocab, d)` matrix `w`, differentiable for `h` (CPU, f32). With `train` the forward
/// pass also prepares `h`'s gradient; without it the op has no backward.
pub fn projected_nll(h: &Tensor, w: &Tensor, targets: &[u32], train: bool) -> Result<Tensor> {
    check_head_args(h, w.dims2()?, targets)?;
    let op = ProjectedNll {
        w: Mutex::new(Some(w.contiguous()?)),
        targets: Arc::new(targets.to_vec()),
        train,
        grad: Mutex::new(None),
    };
    let h = h.contiguous()?;
    if train {
        h.apply_op1(op)
    } else {
        h.apply_op1_no_bwd(&op)
    }
}

/// `(n, d)` rows, a `(vocab, d)` matrix (its dims) and `n` targets below `vocab`; else
/// an error naming the shapes.
pub(super) fn check_head_args(h: &Tensor, (v, wd): (usize, usize), targets: &[u32]) -> Result<()> {
    let (n, d) = h.dims2()?;
    if wd != d || targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!(
            "projected nll: {} targets for {n} rows of {d} against a ({v}, {wd}) matrix",
            targets.len()
        );
    }
    Ok(())
}

struct ProjectedNll {
    /// Taken by the forward pass, so the graph, which keeps the op until backward, does
    /// not keep the matrix (for a packed base, a whole expanded copy of it).
    w: Mutex<Option<Tensor>>,
    targets: Arc<Vec<u32>>,
    train: bool,
    /// `(softmax − onehot) · W` per row, from the forward pass for the backward one.
    grad: Mutex<Option<Vec<f32>>>,
}

impl CustomOp1 for ProjectedNll {
    fn name(&self) -> &'static str {
        "projected-nll"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, lh: &Layout) -> Result<(CpuStorage, Shape)> {
        // The blocks below address `hs` by offset, so it must be contiguous rows.
        rows_of(hs, lh)?;
        let (n, d) = lh.shape().dims2()?;
        let Some(w) = self.w.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("projected nll: a second forward pass")
        };
        let v = w.dim(0)?;
        let (ws, wl) = w.storage_and_layout();
        let Storage::Cpu(ws) = &*ws else {
            candle_core::bail!("projected nll: the matrix is not on the CPU")
        };
        let mut nll = vec![0f32; n];
        let mut grad = if self.train {
            vec![0f32; n * d]
        } else {
            Vec::new()
        };
        for start in (0..n).step_by(BLOCK) {
            let c = BLOCK.min(n - start);
            let block = Layout::contiguous_with_offset((c, d), lh.start_offset() + start * d);
            let mut logits = matmul_wt(hs, &block, &w)?;
            let targets = &self.targets[start..start + c];
            rows_in_parallel(&mut logits, v, &mut nll[start..start + c], |row, x, out| {
                let t = targets[row] as usize;
                let xt = x[t];
                // One pass of exponentials, kept for the softmax: 50 million a step.
                let (max, sum) = if self.train {
                    vmath::softmax_in_place(x)
                } else {
                    let max = vmath::max(x);
                    (max, vmath::exp_shifted_sum(x, max))
                };
                // As log_softmax does it: -((x_t − max) − ln Σ).
                *out = -((xt - max) - sum.ln());
                if self.train {
                    x[t] -= 1.0;
                }
            });
            if self.train {
                let dl = CpuStorage::F32(logits);
                let dh =
                    super::matmul::matmul(&dl, ws, (1, c, d, v), &Layout::contiguous((c, v)), wl)?;
                grad[start * d..(start + c) * d].copy_from_slice(dh.as_slice::<f32>()?);
            }
        }
        if self.train {
            *self.grad.lock().unwrap_or_else(|e| e.into_inner()) = Some(grad);
        }
        Ok((CpuStorage::F32(nll), Shape::from(n)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let Some(mut dh) = self.grad.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            candle_core::bail!("projected nll: a second backward pass, or one without training")
        };
        let (_n, d) = h.dims2()?;
        let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
        for (row, gv) in dh.chunks_mut(d).zip(g) {
            row.iter_mut().for_each(|x| *x *= gv);
        }
        Ok(Some(Tensor::from_vec(dh, h.shape(), h.device())?))
    }
}

/// `f(row, row_values, row_output)` over the rows of `x` (each `len` long) and one output
/// value per row, on candle's thread count (rayon's pool, as `par_rows`).
fn rows_in_parallel(
    x: &mut [f32],
    len: usize,
    out: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut f32) + Sync,
) {
    let rows = out.len();
    let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
    let per = rows.div_ceil(threads).max(1);
    x.par_chunks_mut(per * len)
        .zip(out.par_chunks_mut(per))
        .enumerate()
        .for_each(|(ci, (xc, oc))| {
            for (j, (xr, o)) in xc.chunks_mut(len).zip(oc.iter_mut()).enumerate() {
                f(ci * per + j, xr, o);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::super::tests::{agree, fd_error, rand_vec};
    use super::super::{cross_entropy_rows, frozen_linear};
    use super::*;
    use candle_core::{DType, Device};

    #[test]
    fn projected_nll_matches_the_composed_ops_and_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        // More rows than a block, so the blocks' seams are crossed.
        let (n, d, v) = (BLOCK + 5, 6usize, 11usize);
        let w = (Tensor::from_vec(rand_vec(v * d, 41), (v, d), &dev)? * 2.0)?;
        let targets: Vec<u32> = (0..n as u32).map(|i| (i * 7) % v as u32).collect();
        let h = rand_vec(n * d, 42);
        let fused = |h: &Tensor| projected_nll(h, &w, &targets, true);
        let wf = super::super::Frozen::from(w.clone());
        let composed = |h: &Tensor| cross_entropy_rows(&frozen_linear(h, &wf)?, &targets);
        assert!(agree(&fused, &composed, h.clone(), &[n, d])? < 1e-5);
        // Finite differences on a few rows (each probe reruns the whole forward).
        let few = 3 * d;
        let rest = Tensor::from_vec(h[few..].to_vec(), (n - 3, d), &dev)?;
        let head = |x: &Tensor| projected_nll(&Tensor::cat(&[x, &rest], 0)?, &w, &targets, true);
        assert!(fd_error(&head, h[..few].to_vec(), &[3, d])? < 2e-3);
        // Without training: the same values, and no gradient kept.
        let ht = Tensor::from_vec(h, (n, d), &dev)?;
        let a = projected_nll(&ht, &w, &targets, false)?;
        let b = composed(&ht)?;
        let diff = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }

    #[test]
    fn projected_nll_names_what_does_not_fit() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::zeros((11, 6), DType::F32, &dev)?;
        let h = Tensor::zeros((3, 6), DType::F32, &dev)?;
        assert!(projected_nll(&h, &w, &[0, 1, 11], true).is_err());
        assert!(projected_nll(&h, &w, &[0, 1], true).is_err());
        let narrow = Tensor::zeros((3, 5), DType::F32, &dev)?;
        assert!(projected_nll(&narrow, &w, &[0, 1, 2], true).is_err());
        assert!(projected_nll(&h, &w, &[0, 1, 10], true).is_ok());
        Ok(())
    }
}
