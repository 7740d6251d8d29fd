//! Attention for every device: the fused op's contract ([`super::multi_head_attention`])
//! written with candle tensor ops, so CUDA (and any backend candle has) runs it, with the
//! fused op's memory property. Queries go through in blocks of rows: a block's scores
//! and probabilities live only while that block is computed, forward and backward (which
//! recomputes them, as flash attention does), so no `t × t` matrix per head is ever kept
//! and the transient one is a block's, not the whole sequence's.
//!
//! The graph holds only the three inputs. The forward pass runs on detached tensors and
//! its result enters the graph through a custom op whose forward hands that result over
//! and whose backward is the blocked recompute below.

use super::generic::{hand_over_forwards, Handover};
use super::{rope_primitive, Heads};
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor, D};

/// Rotary tables `(t, dim/2)`, or `(b, 1, t, dim/2)` per token, as tensors on the inputs'
/// device.
#[derive(Clone)]
pub struct RopeTensors {
    pub cos: Tensor,
    pub sin: Tensor,
}

/// [`super::multi_head_attention`] on any device and dtype: `softmax(rope(q)·rope(k)ᵀ ·
/// scale + mask) · v` over `(b·t, q·dim)` queries and `(b·tk, kv·dim)` keys and values.
/// `mask` is additive, `(b, 1, t, tk)` (an [`super::AttnMask`]'s tensor). The softmax is
/// taken in f32 whatever the inputs' dtype; products run in the inputs' dtype.
pub fn blocked_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    scale: f64,
    rope: Option<&RopeTensors>,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    // A block's scores are about the size of the queries themselves.
    let rows = (heads.t * heads.dim / heads.tk.max(1)).clamp(1, heads.t.max(1));
    attention_in_blocks(q, k, v, heads, scale, rope, mask, rows)
}

#[allow(clippy::too_many_arguments)]
pub(super) fn attention_in_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: Heads,
    scale: f64,
    rope: Option<&RopeTensors>,
    mask: Option<&Tensor>,
    rows: usize,
) -> Result<Tensor> {
    let Heads { b, t, tk, dim, .. } = heads;
    let ok = heads.kv > 0
        && heads.q.is_multiple_of(heads.kv)
        && rope.is_none_or(|r| {
            let shared = r.cos.dims() == [t, dim / 2];
            tk == t
                && (shared || r.cos.dims() == [b, 1, t, dim / 2])
                && r.sin.dims() == r.cos.dims()
        })
        && mask.is_none_or(|m| m.dims() == [b, 1, t, tk])
        && q.dims() == [b * t, heads.q * dim]
        && k.dims() == [b * tk, heads.kv * dim]
        && v.dims() == [b * tk, heads.kv * dim];
    if !ok {
        candle_core::bail!(
            "attention: {heads:?} with q {:?}, k {:?}, v {:?}, mask {:?}",
            q.dims(),
            k.dims(),
            v.dims(),
            mask.map(|m| m.dims().to_vec())
        );
    }
    let op = Blocked {
        heads,
        scale,
        rope: rope.cloned(),
        mask: mask.cloned(),
        rows: rows.max(1),
    };
    let out = op.forward(&q.detach(), &k.detach(), &v.detach())?;
    q.apply_op3(
        k,
        v,
        Op {
            geometry: op,
            out: Handover::new(out),
        },
    )
}

struct Blocked {
    heads: Heads,
    scale: f64,
    rope: Option<RopeTensors>,
    mask: Option<Tensor>,
    /// Query rows per block.
    rows: usize,
}

/// The op in the graph: [`Blocked`]'s backward, its forward's result handed over.
struct Op {
    geometry: Blocked,
    out: Handover,
}

impl Blocked {
    /// `(b·len, n·dim)` rows as `(b, n, len, dim)` heads, rotated when asked.
    fn split(&self, x: &Tensor, n: usize, len: usize, rotate: bool) -> Result<Tensor> {
        let g = self.heads;
        let x = x
            .reshape((g.b, len, n, g.dim))?
            .transpose(1, 2)?
            .contiguous()?;
        match (&self.rope, rotate) {
            (Some(r), true) => rope_primitive(&x, &r.cos, &r.sin),
            _ => Ok(x),
        }
    }

    /// The inverse of [`Blocked::split`]; `unrotate` applies the rotation's transpose
    /// (the backward of the rotation).
    fn merge(&self, x: &Tensor, n: usize, len: usize, unrotate: bool) -> Result<Tensor> {
        let g = self.heads;
        let x = match (&self.rope, unrotate) {
            (Some(r), true) => rope_primitive(x, &r.cos, &r.sin.neg()?)?,
            _ => x.clone(),
        };
        x.transpose(1, 2)?
            .contiguous()?
            .reshape((g.b * len, n * g.dim))
    }

    /// Probabilities `(b, kv, rep·n, tk)` of query rows `i0..i0+n`, from the block's
    /// queries `(b, kv, rep·n, dim)` (the `rep` query heads of a key head stacked, so one
    /// product scores them all without repeating keys).
    fn probabilities(&self, qb: &Tensor, k: &Tensor, i0: usize, n: usize) -> Result<Tensor> {
        let g = self.heads;
        let rep = g.q / g.kv;
        let s = qb.matmul(&k.t()?)?.to_dtype(DType::F32)?;
        let s = (s * self.scale)?;
        let s = match &self.mask {
            Some(m) => s
                .reshape((g.b, g.kv, rep, n, g.tk))?
                .broadcast_add(
                    &m.narrow(2, i0, n)?
                        .to_dtype(DType::F32)?
                        .reshape((g.b, 1, 1, n, g.tk))?,
                )?
                .reshape((g.b, g.kv, rep * n, g.tk))?,
            None => s,
        };
        candle_nn::ops::softmax_last_dim(&s)
    }

    /// The block `i0..i0+n` of `(b, kv, rep, t, dim)` rows, as `(b, kv, rep·n, dim)`.
    fn block(&self, x: &Tensor, i0: usize, n: usize) -> Result<Tensor> {
        let g = self.heads;
        x.narrow(3, i0, n)?
            .contiguous()?
            .reshape((g.b, g.kv, (g.q / g.kv) * n, g.dim))
    }

    fn blocks(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let t = self.heads.t;
        (0..t)
            .step_by(self.rows)
            .map(move |i0| (i0, self.rows.min(t - i0)))
    }

    /// Rotated, head-split queries grouped by key head `(b, kv, rep, t, dim)`, and keys
    /// and values `(b, kv, tk, dim)`.
    fn heads_of(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor, Tensor)> {
        let g = self.heads;
        let q = self
            .split(q, g.q, g.t, true)?
            .reshape((g.b, g.kv, g.q / g.kv, g.t, g.dim))?;
        Ok((
            q,
            self.split(k, g.kv, g.tk, true)?,
            self.split(v, g.kv, g.tk, false)?,
        ))
    }

    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let g = self.heads;
        let rep = g.q / g.kv;
        let (qh, kh, vh) = self.heads_of(q, k, v)?;
        let mut outs = Vec::new();
        for (i0, n) in self.blocks() {
            let p = self.probabilities(&self.block(&qh, i0, n)?, &kh, i0, n)?;
            let o = p.to_dtype(vh.dtype())?.matmul(&vh)?;
            outs.push(o.reshape((g.b, g.kv, rep, n, g.dim))?);
        }
        let o = Tensor::cat(&outs, 3)?.reshape((g.b, g.q, g.t, g.dim))?;
        self.merge(&o, g.q, g.t, false)
    }

    fn backward(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        grad: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let g = self.heads;
        let rep = g.q / g.kv;
        let (qh, kh, vh) = self.heads_of(q, k, v)?;
        let dout = self
            .split(grad, g.q, g.t, false)?
            .reshape((g.b, g.kv, rep, g.t, g.dim))?;
        let mut dk = kh.zeros_like()?.to_dtype(DType::F32)?;
        let mut dv = dk.clone();
        let mut dqs = Vec::new();
        for (i0, n) in self.blocks() {
            let qb = self.block(&qh, i0, n)?;
            let p = self.probabilities(&qb, &kh, i0, n)?;
            let gb = self.block(&dout, i0, n)?;
            let p_in = p.to_dtype(gb.dtype())?;
            // dV = Pᵀ·dO; the `rep` stacked query heads sum inside the product.
            dv = (dv + p_in.t()?.matmul(&gb)?.to_dtype(DType::F32)?)?;
            // dS = P ⊙ (dP − Σ dP⊙P) · scale, with dP = dO·Vᵀ.
            let dp = gb.matmul(&vh.t()?)?.to_dtype(DType::F32)?;
            let dot = (&dp * &p)?.sum_keepdim(D::Minus1)?;
            let ds = ((p * dp.broadcast_sub(&dot)?)? * self.scale)?.to_dtype(qb.dtype())?;
            dqs.push(ds.matmul(&kh)?.reshape((g.b, g.kv, rep, n, g.dim))?);
            dk = (dk + ds.t()?.matmul(&qb)?.to_dtype(DType::F32)?)?;
        }
        let dq = Tensor::cat(&dqs, 3)?.reshape((g.b, g.q, g.t, g.dim))?;
        let dtype = q.dtype();
        Ok((
            self.merge(&dq, g.q, g.t, true)?,
            self.merge(&dk.to_dtype(dtype)?, g.kv, g.tk, true)?,
            self.merge(&dv.to_dtype(dtype)?, g.kv, g.tk, false)?,
        ))
    }
}

impl CustomOp3 for Op {
    fn name(&self) -> &'static str {
        "blocked-attention"
    }

    hand_over_forwards!(3);

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (dq, dk, dv) =
            self.geometry
                .backward(&q.detach(), &k.detach(), &v.detach(), &grad.detach())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{agree, rand_vec};
    use super::super::{multi_head_attention, AttnMask, RopeTables};
    use super::*;
    use candle_core::Device;

    type Op<'a> = &'a dyn Fn(&Tensor, &Tensor, &Tensor) -> Result<Tensor>;

    /// Through each input in turn (the other two held): the blocked op and the fused CPU
    /// op agree on the output and on that input's gradient (relative to the largest
    /// entry).
    fn compare(q: &Tensor, k: &Tensor, v: &Tensor, blocked: Op, fused: Op) -> Result<()> {
        let inputs = [("q", q), ("k", k), ("v", v)];
        for (i, (name, x)) in inputs.iter().enumerate() {
            let with = |f: Op, x: &Tensor| {
                let mut args = [q.clone(), k.clone(), v.clone()];
                args[i] = x.clone();
                f(&args[0], &args[1], &args[2])
            };
            let (b, f) = (|x: &Tensor| with(blocked, x), |x: &Tensor| with(fused, x));
            let values = x.flatten_all()?.to_vec1::<f32>()?;
            let a = agree(&b, &f, values, x.dims())?;
            assert!(a < 1e-5, "{name}: blocked and fused differ by {a}");
        }
        Ok(())
    }

    /// Causal, rotated, grouped-query (4 heads over 2), left padding in the second
    /// sequence, and blocks of 2 rows over 7 positions (the last block short).
    #[test]
    fn causal_blocks_match_the_fused_op_in_values_and_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let g = Heads {
            b: 2,
            t: 7,
            tk: 7,
            q: 4,
            kv: 2,
            dim: 4,
        };
        let ang = (Tensor::from_vec(rand_vec(g.t * 2, 61), (g.t, 2), &dev)? * 3.0)?;
        let rot = RopeTensors {
            cos: ang.cos()?,
            sin: ang.sin()?,
        };
        let tables = RopeTables::new(&rot.cos, &rot.sin)?;
        let mut m = vec![0f32; g.b * g.t * g.t];
        for bi in 0..g.b {
            for i in 0..g.t {
                for j in 0..g.t {
                    if j > i || (bi == 1 && j < 2 && i >= 2) {
                        m[(bi * g.t + i) * g.t + j] = super::super::MASKED;
                    }
                }
            }
        }
        let mask = AttnMask::new(m, g.b, g.t, g.t, &dev)?;
        let n = g.b * g.t;
        let (qd, kd) = (g.q * g.dim, g.kv * g.dim);
        let q = Tensor::from_vec(rand_vec(n * qd, 62), (n, qd), &dev)?;
        let k = Tensor::from_vec(rand_vec(n * kd, 63), (n, kd), &dev)?;
        let v = Tensor::from_vec(rand_vec(n * kd, 64), (n, kd), &dev)?;
        let blocked = |q: &Tensor, k: &Tensor, v: &Tensor| {
            attention_in_blocks(q, k, v, g, 0.5, Some(&rot), Some(&mask.tensor), 2)
        };
        let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
            multi_head_attention(q, k, v, g, 0.5, Some(&tables), Some(&mask))
        };
        compare(&q, &k, &v, &blocked, &fused)
    }

    /// The UNet's cross-attention shape: 6 queries against 3 keys, no rotation or mask,
    /// blocks of 4 rows; and the default block size on the same inputs.
    #[test]
    fn cross_attention_blocks_match_the_fused_op() -> Result<()> {
        let dev = Device::Cpu;
        let g = Heads {
            b: 2,
            t: 6,
            tk: 3,
            q: 2,
            kv: 2,
            dim: 4,
        };
        let (qd, kd) = (g.q * g.dim, g.kv * g.dim);
        let (nq, nk) = (g.b * g.t, g.b * g.tk);
        let q = Tensor::from_vec(rand_vec(nq * qd, 71), (nq, qd), &dev)?;
        let k = Tensor::from_vec(rand_vec(nk * kd, 72), (nk, kd), &dev)?;
        let v = Tensor::from_vec(rand_vec(nk * kd, 73), (nk, kd), &dev)?;
        for rows in [4, 0] {
            let blocked = |q: &Tensor, k: &Tensor, v: &Tensor| match rows {
                0 => blocked_attention(q, k, v, g, 0.5, None, None),
                r => attention_in_blocks(q, k, v, g, 0.5, None, None, r),
            };
            let fused = |q: &Tensor, k: &Tensor, v: &Tensor| {
                multi_head_attention(q, k, v, g, 0.5, None, None)
            };
            compare(&q, &k, &v, &blocked, &fused)?;
        }
        Ok(())
    }

    #[test]
    fn blocked_attention_refuses_shapes_that_do_not_fit() -> Result<()> {
        let dev = Device::Cpu;
        let g = Heads {
            b: 1,
            t: 3,
            tk: 3,
            q: 2,
            kv: 2,
            dim: 2,
        };
        let x = Tensor::zeros((3, 4), DType::F32, &dev)?;
        assert!(blocked_attention(&x, &x, &x, g, 1.0, None, None).is_ok());
        assert!(blocked_attention(&x, &x, &x, Heads { kv: 3, ..g }, 1.0, None, None).is_err());
        let bad_mask = Tensor::zeros((1, 1, 3, 2), DType::F32, &dev)?;
        assert!(blocked_attention(&x, &x, &x, g, 1.0, None, Some(&bad_mask)).is_err());
        Ok(())
    }
}
