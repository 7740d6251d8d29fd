//! Differentiable building blocks, and the ops that make frozen weights cheap.
//!
//! candle's fused `rms_norm`, `softmax_last_dim` and `rope` have no backward pass
//! (their gradient silently never arrives), and the primitive formulations that do
//! have one are slow to differentiate and keep several copies of their input alive.
//! So on CPU in f32 each is a custom op with a hand-written backward (itself a
//! no-backward custom op); other devices and dtypes take the primitive path.
//! `frozen_linear` skips the weight gradient that candle would otherwise compute, and
//! keep, for every frozen matmul.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, Layout, Result, Shape, Storage,
    Tensor, D,
};
use rayon::prelude::*;
use std::sync::Arc;

mod attention;
mod blocked;
mod conv;
mod frozen;
mod generic;
mod head_loss;
pub mod matmul;
mod norm_act;
mod vmath;
mod winograd;
pub use attention::{causal_attention, multi_head_attention, packed_attention, Heads, RopeTables};
pub use blocked::{blocked_attention, RopeTensors};
pub use conv::{conv2d, frozen_conv2d, max_pool2d};
pub use frozen::Frozen;
pub use generic::{projected_nll_generic, projected_nll_vocab_blocks};
pub use head_loss::projected_nll;
pub use norm_act::{
    geglu, geglu_composed, gelu_erf, group_norm, group_norm_composed, layer_norm,
    layer_norm_residual,
};

/// Masked attention scores get this; large but finite so a sum never turns into NaN.
pub const MASKED: f32 = -1e30;

/// `x · Wᵀ (+ bias)` for a frozen `(out, in)` weight, computed inside the op so that the
/// graph keeps one output buffer and no copy of it, and on the way back only `dX = g · W`
/// (candle would otherwise compute, and keep, a weight gradient nobody reads).
struct FrozenLinear {
    w: Frozen,
    bias: Option<Tensor>,
}

/// `x · Wᵀ` into a fresh `(n, out)` buffer (by the BLAS when there is one).
fn matmul_wt(xs: &CpuStorage, lx: &Layout, w: &Tensor) -> Result<Vec<f32>> {
    let (n, k) = lx.shape().dims2()?;
    let (m, wk) = w.dims2()?;
    if wk != k {
        candle_core::bail!("frozen linear: input has {k} features, weight expects {wk}");
    }
    let (ws, wl) = w.storage_and_layout();
    let Storage::Cpu(ws) = &*ws else {
        candle_core::bail!("frozen linear: weight is not on the CPU")
    };
    match matmul::matmul(xs, ws, (1, n, m, k), lx, &wl.transpose(0, 1)?)? {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("frozen linear: expected f32"),
    }
}

fn add_bias(y: &mut [f32], bias: &Option<Tensor>) -> Result<()> {
    if let Some(b) = bias {
        let b: Vec<f32> = b.to_vec1()?;
        par_rows(y, b.len(), |_, chunk| {
            for row in chunk.chunks_mut(b.len()) {
                row.iter_mut().zip(&b).for_each(|(y, b)| *y += b);
            }
        });
    }
    Ok(())
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut y = matmul_wt(xs, lx, &self.w.dense()?)?;
        add_bias(&mut y, &self.bias)?;
        let shape = Shape::from((lx.dims()[0], self.w.dim(0)?));
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(matmul::mm(g, &self.w.dense()?)?))
    }
}

/// `x + c` for a constant `c` (nothing it is computed from trains: a frozen bias, an
/// untrained embedding) broadcast over `x`. On the CPU in f32 one op whose backward hands
/// `x` its gradient and computes none for `c`: candle's `broadcast_add` computes a
/// gradient for the broadcast `c` as large as `x` and keeps it until the step ends, nobody
/// reading it. A `c` that trains, or a broadcast of another shape, takes `broadcast_add`.
pub fn add_frozen(x: &Tensor, c: &Tensor) -> Result<Tensor> {
    if fast_path(x) && !c.track_op() && c.dtype() == DType::F32 {
        if let Some(inner) = periodic_broadcast(x.dims(), c.dims()) {
            let op = AddFrozen {
                c: c.flatten_all()?.to_vec1()?,
                inner,
            };
            return x.contiguous()?.apply_op1(op);
        }
    }
    x.broadcast_add(c)
}

/// Whether `c` broadcast to `x` repeats its values in order, each over `inner` consecutive
/// elements of `x`: with `c`'s dims aligned to the right of `x`'s, they are 1 outside
/// one run of dims that equals `x`'s there. Returns `inner`, the product of `x`'s dims
/// after the run.
fn periodic_broadcast(x: &[usize], c: &[usize]) -> Option<usize> {
    let pad = x.len().checked_sub(c.len())?;
    let full: Vec<usize> = std::iter::repeat_n(1, pad)
        .chain(c.iter().copied())
        .collect();
    let Some(first) = full.iter().position(|&d| d != 1) else {
        return Some(1);
    };
    let last = full.iter().rposition(|&d| d != 1)?;
    (full[first..=last] == x[first..=last]).then(|| x[last + 1..].iter().product())
}

/// `out[i] = x[i] + c[(i / inner) mod c.len()]`.
struct AddFrozen {
    c: Vec<f32>,
    inner: usize,
}

impl CustomOp1 for AddFrozen {
    fn name(&self) -> &'static str {
        "add-frozen"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let (n, inner) = (self.c.len(), self.inner.max(1));
        let mut out = vec![0f32; x.len()];
        if inner == 1 {
            // A bias over the last dim: one row of `c` per row of `x`.
            par_rows(&mut out, n, |first, chunk| {
                let xs = &x[first * n..][..chunk.len()];
                for (o, xr) in chunk.chunks_mut(n).zip(xs.chunks(n)) {
                    for ((o, &xv), &cv) in o.iter_mut().zip(xr).zip(&self.c) {
                        *o = xv + cv;
                    }
                }
            });
        } else {
            par_rows(&mut out, inner, |first, chunk| {
                let xs = &x[first * inner..][..chunk.len()];
                for (j, (o, xr)) in chunk.chunks_mut(inner).zip(xs.chunks(inner)).enumerate() {
                    let cv = self.c[(first + j) % n];
                    for (o, &xv) in o.iter_mut().zip(xr) {
                        *o = xv + cv;
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.clone()))
    }
}

/// A frozen linear layer plus its LoRA update, `x·Wᵀ + bias + s·(xa·Bᵀ)` with
/// `xa = dropout(x)·Aᵀ`, as one op over `(x, xa, B)`: the update is added in place, so
/// the graph holds one `(n, out)` buffer per layer instead of five.
struct LoraLinear {
    w: Frozen,
    bias: Option<Tensor>,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        xas: &CpuStorage,
        lxa: &Layout,
        bs: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let mut y = matmul_wt(xs, lx, &self.w.dense()?)?;
        let (n, r) = lxa.shape().dims2()?;
        let (m, br) = lb.shape().dims2()?;
        if br != r || n != lx.dims()[0] || self.w.dim(0)? != m {
            candle_core::bail!("lora linear: shapes {:?}, {:?}", lxa.dims(), lb.dims());
        }
        let (xa, b) = (rows_of(xas, lxa)?, rows_of(bs, lb)?);
        add_update(&mut y, xa, b, (m, r), self.scale as f32);
        add_bias(&mut y, &self.bias)?;
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        xa: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gs = (g * self.scale)?;
        // The first layer's input is constant: skip its (n, in) GEMM entirely.
        let dx = if x.track_op() {
            Some(matmul::mm(g, &self.w.dense()?)?)
        } else {
            None
        };
        // Detached: B and xa carry graphs, and a gradient built on them would keep this
        // step's whole graph alive through B's gradient and the optimizer state.
        let dxa = matmul::mm(&gs, &b.detach())?;
        let db = matmul::mm(&gs.t()?, &xa.detach())?;
        Ok((dx, Some(dxa), Some(db)))
    }
}

/// `y += s·(xa·Bᵀ)` for `(n, out)` rows `y`, `(n, r)` rows `xa` and LoRA's `(out, r)` B.
fn add_update(y: &mut [f32], xa: &[f32], b: &[f32], (m, r): (usize, usize), s: f32) {
    // Bᵀ as (r, out) rows, so the update streams along output features.
    let mut bt = vec![0f32; r * m];
    for (j, brow) in b.chunks(r).enumerate() {
        for (k, &v) in brow.iter().enumerate() {
            bt[k * m + j] = v;
        }
    }
    // Added in place with a per-row scratch: an (n, out) temporary here would be
    // allocated and freed per layer per step, and fragments the heap.
    par_rows(y, m, |first, chunk| {
        let mut delta = vec![0f32; m];
        for (i, yr) in chunk.chunks_mut(m).enumerate() {
            let xr = &xa[(first + i) * r..][..r];
            delta.iter_mut().for_each(|d| *d = 0.0);
            for (k, &xv) in xr.iter().enumerate() {
                let bk = &bt[k * m..][..m];
                delta.iter_mut().zip(bk).for_each(|(d, &bv)| *d += xv * bv);
            }
            // PEFT's order: base + (B(A x) · s).
            yr.iter_mut().zip(&delta).for_each(|(y, d)| *y += d * s);
        }
    });
}

/// A frozen linear layer and its LoRA update without dropout, `x·Wᵀ + bias + s·(x·Aᵀ)·Bᵀ`,
/// as one op over `(x, A, B)`. Where [`LoraLinear`] leaves `x·Aᵀ` to candle's graph, whose
/// backward builds `x`'s share `dxa·A` as a second `(n, in)` gradient and adds the two,
/// this backward adds `dxa·A` into `g·W` inside the same buffer, and scales the thin
/// `(n, r)` and `(out, r)` products rather than the `(n, out)` output gradient.
struct LoraLinearA {
    w: Frozen,
    bias: Option<Tensor>,
    scale: f64,
    /// `x·Aᵀ` from the forward pass, for the backward one.
    xa: std::sync::Mutex<Option<Vec<f32>>>,
}

impl CustomOp3 for LoraLinearA {
    fn name(&self) -> &'static str {
        "lora-linear-a"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        as_: &CpuStorage,
        la: &Layout,
        bs: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lx.shape().dims2()?;
        let ((r, ak), (m, br)) = (la.shape().dims2()?, lb.shape().dims2()?);
        if ak != k || br != r || self.w.dims2()? != (m, k) {
            candle_core::bail!(
                "lora linear: x {:?}, A {:?}, B {:?} against a weight of {:?}",
                lx.dims(),
                la.dims(),
                lb.dims(),
                self.w.dims()
            );
        }
        let mut y = matmul_wt(xs, lx, &self.w.dense()?)?;
        let xa = match matmul::matmul(xs, as_, (1, n, r, k), lx, &la.transpose(0, 1)?)? {
            CpuStorage::F32(v) => v,
            _ => candle_core::bail!("lora linear: expected f32"),
        };
        add_update(&mut y, &xa, rows_of(bs, lb)?, (m, r), self.scale as f32);
        add_bias(&mut y, &self.bias)?;
        *self.xa.lock().unwrap_or_else(|e| e.into_inner()) = Some(xa);
        Ok((CpuStorage::F32(y), Shape::from((n, m))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Cloned, not taken: a graph may be differentiated twice. It is (n, r), small.
        let Some(xa) = self.xa.lock().unwrap_or_else(|e| e.into_inner()).clone() else {
            candle_core::bail!("lora linear: a backward pass without its forward")
        };
        let ((n, k), (r, _), (m, _)) = (x.dims2()?, a.dims2()?, b.dims2()?);
        let s = self.scale as f32;
        let g = g.contiguous()?;
        let (gs, gl) = g.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let (Storage::Cpu(gs), Storage::Cpu(bs)) = (&*gs, &*bs) else {
            candle_core::bail!("lora linear: gradients off the CPU")
        };
        let f32s = |v: CpuStorage| -> Result<Vec<f32>> {
            match v {
                CpuStorage::F32(v) => Ok(v),
                _ => candle_core::bail!("lora linear: expected f32"),
            }
        };
        // dxa = s·(g·B), (n, r).
        let mut dxa = f32s(matmul::matmul(gs, bs, (1, n, r, m), gl, bl)?)?;
        dxa.iter_mut().for_each(|v| *v *= s);
        // dB = s·(gᵀ·xa), (out, r).
        let xa_s = CpuStorage::F32(xa);
        let mut db = f32s(matmul::matmul(
            gs,
            &xa_s,
            (1, m, r, n),
            &gl.transpose(0, 1)?,
            &Layout::contiguous((n, r)),
        )?)?;
        db.iter_mut().for_each(|v| *v *= s);
        let dxa_s = CpuStorage::F32(dxa);
        // dA = dxaᵀ·x, (r, in).
        let x = x.contiguous()?;
        let (xs, xl) = x.storage_and_layout();
        let Storage::Cpu(xs) = &*xs else {
            candle_core::bail!("lora linear: input off the CPU")
        };
        let da = f32s(matmul::matmul(
            &dxa_s,
            xs,
            (1, r, k, n),
            &Layout::contiguous((n, r)).transpose(0, 1)?,
            xl,
        )?)?;
        // The first layer's input is constant: no (n, in) gradient at all.
        let dx = if x.track_op() {
            let w = self.w.dense()?;
            let (ws, wl) = w.storage_and_layout();
            let Storage::Cpu(ws) = &*ws else {
                candle_core::bail!("lora linear: weight off the CPU")
            };
            let mut dx = f32s(matmul::matmul(gs, ws, (1, n, k, m), gl, wl)?)?;
            let (as_, al) = a.storage_and_layout();
            let Storage::Cpu(as_) = &*as_ else {
                candle_core::bail!("lora linear: A off the CPU")
            };
            matmul::matmul_acc(
                &mut dx,
                dxa_s.as_slice::<f32>()?,
                &Layout::contiguous((n, r)),
                as_.as_slice::<f32>()?,
                al,
                (n, k, r),
            )?;
            Some(Tensor::from_vec(dx, (n, k), x.device())?)
        } else {
            None
        };
        let dev = x.device();
        Ok((
            dx,
            Some(Tensor::from_vec(da, (r, k), dev)?),
            Some(Tensor::from_vec(db, (m, r), dev)?),
        ))
    }
}

/// `x · Wᵀ` for a 2-D `x` and a frozen `(out, in)` weight, without the weight gradient.
/// A packed weight is expanded for the product and again for the backward one, and
/// held packed in between.
pub fn frozen_linear(x: &Tensor, w: &Frozen) -> Result<Tensor> {
    if !fast_path(x) || w.dtype() != DType::F32 {
        return generic::frozen_linear_generic(x, w);
    }
    x.contiguous()?.apply_op1(FrozenLinear {
        w: w.clone(),
        bias: None,
    })
}

/// [`frozen_linear`] plus a frozen `bias` (`(out,)`, nothing it comes from trains), added
/// in the same op: one `(n, out)` buffer for the layer instead of two, and one gradient
/// for candle's backward to zero-fill and add into instead of two (an encoder's key,
/// output and feed-forward layers). A bias that trains takes [`add_frozen`]'s way.
pub fn frozen_linear_bias(x: &Tensor, w: &Frozen, bias: Option<&Tensor>) -> Result<Tensor> {
    let Some(b) = bias else {
        return frozen_linear(x, w);
    };
    if !fused_linear_fits(x, w, bias)? {
        return add_frozen(&frozen_linear(x, w)?, b);
    }
    x.contiguous()?.apply_op1(FrozenLinear {
        w: w.clone(),
        bias: Some(b.clone()),
    })
}

/// `gelu(h)·Wᵀ + bias` (the exact GELU) for a frozen `W` and bias, as one op over the
/// pre-activation `h`: a feed-forward's second layer with its activation. The activation
/// is made inside the op and dropped after the product (a frozen weight's backward needs
/// only `dh = (g·W) · gelu'(h)`, from `h`), so the graph holds neither `gelu(h)` nor its
/// gradient: for an encoder at 2048 tokens, two 12.6 MB buffers a layer and a zero-fill
/// and add of one in candle's backward. The values are those of [`norm_act::gelu_erf`]
/// then [`frozen_linear_bias`], bit for bit.
pub fn gelu_frozen_linear(h: &Tensor, w: &Frozen, bias: Option<&Tensor>) -> Result<Tensor> {
    if !fused_linear_fits(h, w, bias)? {
        return frozen_linear_bias(&gelu_erf(h)?, w, bias);
    }
    h.contiguous()?.apply_op1(GeluLinear {
        w: w.clone(),
        bias: bias.cloned(),
    })
}

/// Whether [`FrozenLinear`] or [`GeluLinear`] takes `x` (`(n, in)` f32 rows on the CPU),
/// an f32 weight and a bias that is frozen, f32 and `(out,)` (or none).
fn fused_linear_fits(x: &Tensor, w: &Frozen, bias: Option<&Tensor>) -> Result<bool> {
    let bias_fits = match bias {
        Some(b) => !b.track_op() && b.dtype() == DType::F32 && b.dims() == [w.dim(0)?],
        None => true,
    };
    Ok(fast_path(x) && w.dtype() == DType::F32 && x.rank() == 2 && bias_fits)
}

struct GeluLinear {
    w: Frozen,
    bias: Option<Tensor>,
}

impl CustomOp1 for GeluLinear {
    fn name(&self) -> &'static str {
        "gelu-frozen-linear"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, lh: &Layout) -> Result<(CpuStorage, Shape)> {
        let (n, k) = lh.shape().dims2()?;
        let u = CpuStorage::F32(norm_act::gelu_erf_rows(rows_of(hs, lh)?, k));
        let mut y = matmul_wt(&u, &Layout::contiguous((n, k)), &self.w.dense()?)?;
        drop(u);
        add_bias(&mut y, &self.bias)?;
        Ok((CpuStorage::F32(y), Shape::from((n, self.w.dim(0)?))))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let du = matmul::mm(g, &self.w.dense()?)?;
        Ok(Some(norm_act::gelu_erf_bwd(h, &du)?))
    }
}

/// Whether a LoRA layer's weights are all f32, as the fused CPU ops want them.
fn lora_f32(w: &Frozen, a: &Tensor, b: &Tensor, bias: Option<&Tensor>) -> bool {
    [w.dtype(), a.dtype(), b.dtype()]
        .iter()
        .all(|&t| t == DType::F32)
        && bias.is_none_or(|t| t.dtype() == DType::F32)
}

/// `x·Wᵀ + bias + scale·(xa·Bᵀ)`, where `xa` is `(n, r)` (the input already through
/// dropout and `A`) and `b` is LoRA's `(out, r)` B. Gradients reach `x`, `xa` and `b`.
pub fn lora_linear(
    x: &Tensor,
    w: &Frozen,
    bias: Option<&Tensor>,
    xa: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !fast_path(x) || !lora_f32(w, xa, b, bias) {
        let y = (frozen_linear(x, w)? + (xa.matmul(&b.t()?)? * scale)?)?;
        return match bias {
            Some(bias) => y.broadcast_add(bias),
            None => Ok(y),
        };
    }
    x.contiguous()?.apply_op3(
        &xa.contiguous()?,
        &b.contiguous()?,
        LoraLinear {
            w: w.clone(),
            bias: bias.cloned(),
            scale,
        },
    )
}

/// `x·Wᵀ + bias + scale·(x·Aᵀ)·Bᵀ` for LoRA's `(r, in)` A and `(out, r)` B, with no
/// dropout between `x` and A. Gradients reach `x`, `a` and `b`.
pub fn lora_linear_a(
    x: &Tensor,
    w: &Frozen,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if !fast_path(x) || !lora_f32(w, a, b, bias) || x.rank() != 2 {
        let xa = x.matmul(&a.t()?)?;
        return lora_linear(x, w, bias, &xa, b, scale);
    }
    x.contiguous()?.apply_op3(
        &a.contiguous()?,
        &b.contiguous()?,
        LoraLinearA {
            w: w.clone(),
            bias: bias.cloned(),
            scale,
            xa: std::sync::Mutex::new(None),
        },
    )
}

/// RMSNorm as transformers computes it: in f32, `x · rsqrt(mean(x²) + eps) · w`.
/// On CPU with f32 rows this is one custom op with an analytic backward; elsewhere
/// the primitive formulation, whose backward candle derives.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    if fast_path(x) && w.dtype() == DType::F32 && x.rank() >= 1 {
        let d = x.dim(D::Minus1)?;
        if w.dims() == [d] {
            return x.contiguous()?.apply_op2(&w.contiguous()?, RmsNorm { eps });
        }
    }
    generic::rms_norm_generic(x, w, eps)
}

fn rms_norm_primitive(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let var = x.sqr()?.mean_keepdim(D::Minus1)?;
    let x = x.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
    x.to_dtype(dtype)?.broadcast_mul(w)
}

/// Rotary embedding, HF's half-split layout: `x·cos + rotate_half(x)·sin`.
/// `x` is `(b, h, t, d)`; `cos`/`sin` are `(t, d/2)`, or `(b, 1, t, d/2)` per token.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, t, d) = x.dims4()?;
    if fast_path(x) && d % 2 == 0 && cos.dims() == [t, d / 2] && sin.dims() == [t, d / 2] {
        let op = Rope {
            tables: RopeTables::new(cos, sin)?,
            sign: 1.0,
        };
        return x.contiguous()?.apply_op1(op);
    }
    generic::rope_generic(x, cos, sin)
}

fn rope_primitive(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (_b, _h, _t, d) = x.dims4()?;
    let half = d / 2;
    let cos = Tensor::cat(&[cos, cos], D::Minus1)?;
    let sin = Tensor::cat(&[sin, sin], D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
}

/// Softmax over the last dimension (max-subtracted), in f32.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        return x.contiguous()?.apply_op1(Softmax {
            scale: 1.0,
            mask: None,
        });
    }
    softmax_primitive(x)
}

fn softmax_primitive(x: &Tensor) -> Result<Tensor> {
    let dtype = x.dtype();
    candle_nn::ops::softmax(&x.to_dtype(DType::F32)?, D::Minus1)?.to_dtype(dtype)
}

/// An additive attention mask `(b, 1, t, tk)`, kept both as a tensor (for the primitive
/// path) and as host rows (so the fused softmax reads it without a broadcast copy).
#[derive(Clone)]
pub struct AttnMask {
    pub tensor: Tensor,
    rows: Arc<Vec<f32>>,
    t: usize,
}

impl AttnMask {
    pub fn new(data: Vec<f32>, b: usize, t: usize, tk: usize, dev: &Device) -> Result<Self> {
        let rows = Arc::new(data);
        let tensor = Tensor::from_slice(rows.as_slice(), (b, 1, t, tk), dev)?;
        Ok(Self { tensor, rows, t })
    }
}

/// `softmax(scores · scale + mask)` over the last dim of `(b, h, t, tk)` scores. The
/// fused form never materialises the scaled or masked scores, for forward or backward.
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: &AttnMask) -> Result<Tensor> {
    let (b, _h, t, tk) = scores.dims4()?;
    if fast_path(scores) && t == mask.t && mask.rows.len() == b * t * tk {
        return scores.contiguous()?.apply_op1(Softmax {
            scale: scale as f32,
            mask: Some(mask.clone()),
        });
    }
    // In f32 whatever the scores' dtype: the mask's -1e30 has no f16 value.
    let s = (scores.to_dtype(DType::F32)? * scale)?.broadcast_add(&mask.tensor)?;
    softmax_primitive(&s)?.to_dtype(scores.dtype())
}

/// Per-row negative log-likelihood `-log_softmax(logits)[i, targets[i]]` of `(n, V)`
/// logits. The fused op keeps nothing vocab-sized beyond the logits themselves, and its
/// backward writes `(softmax - onehot) · g` straight into the one gradient buffer.
pub fn cross_entropy_rows(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let (n, v) = logits.dims2()?;
    if targets.len() != n || targets.iter().any(|&t| t as usize >= v) {
        candle_core::bail!(
            "cross entropy: {} targets for {n} rows of {v}",
            targets.len()
        );
    }
    if fast_path(logits) {
        return logits.contiguous()?.apply_op1(CrossEntropy {
            targets: Arc::new(targets.to_vec()),
        });
    }
    let lp = candle_nn::ops::log_softmax(&logits.to_dtype(DType::F32)?, D::Minus1)?;
    let tgt = Tensor::from_vec(targets.to_vec(), (n, 1), logits.device())?;
    lp.gather(&tgt, 1)?.squeeze(1)?.neg()
}

/// `silu(gate) · up`, the SwiGLU product. Fused, the graph keeps only `gate` and `up`
/// (which it holds anyway) instead of also `silu(gate)` and a broadcast copy.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if fast_path(gate) && up.dtype() == DType::F32 && gate.shape() == up.shape() {
        return gate.contiguous()?.apply_op2(&up.contiguous()?, SwiGlu);
    }
    candle_nn::ops::silu(gate)? * up
}

struct SwiGlu;

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu-train"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        lg: &Layout,
        us: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (rows_of(gs, lg)?, rows_of(us, lu)?);
        let k = *lg.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, k, |first, chunk| {
            let (g, u) = (&g[first * k..], &u[first * k..]);
            vmath::silu_mul(chunk, g, u);
        });
        Ok((CpuStorage::F32(out), lg.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = gate.apply_op3_no_bwd(up, &g.contiguous()?, &SwiGluBwd)?;
        let dgate = packed.get(0)?;
        let dup = packed.get(1)?;
        Ok((Some(dgate), Some(dup)))
    }
}

/// `(dgate, dup)` packed as `(2, ...)`: dgate = g·up·σ(x)·(1 + x·(1 − σ(x))), dup = g·silu(x).
struct SwiGluBwd;

impl CustomOp3 for SwiGluBwd {
    fn name(&self) -> &'static str {
        "swiglu-train-bwd"
    }

    fn cpu_fwd(
        &self,
        gs: &CpuStorage,
        lg: &Layout,
        us: &CpuStorage,
        lu: &Layout,
        ds: &CpuStorage,
        ld: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, u, d) = (rows_of(gs, lg)?, rows_of(us, lu)?, rows_of(ds, ld)?);
        let n = x.len();
        let k = *lg.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; 2 * n];
        let (dgate, dup) = out.split_at_mut(n);
        // One pass writes both halves: σ(x) once per element serves dgate and dup.
        let rows = n / k.max(1);
        let threads = candle_core::utils::get_num_threads().clamp(1, rows.max(1));
        let per = rows.div_ceil(threads).max(1) * k.max(1);
        dgate
            .par_chunks_mut(per)
            .zip(dup.par_chunks_mut(per))
            .enumerate()
            .for_each(|(c, (dg, du))| {
                let o = c * per;
                vmath::silu_mul_bwd(dg, du, &x[o..], &u[o..], &d[o..]);
            });
        let mut dims = vec![2];
        dims.extend_from_slice(lg.dims());
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Whether the fused kernels apply to `x`: they are CPU, f32, contiguous-row loops.
/// `LORAFORGE_GENERIC_OPS=1` turns them off, so the path every other device takes (the
/// GPU's) runs, and is tested, on the CPU.
pub(crate) fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !generic_forced()
}

/// `LORAFORGE_GENERIC_OPS=1` in the environment (read once).
pub fn generic_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var("LORAFORGE_GENERIC_OPS").as_deref() == Ok("1"))
}

fn rows_of<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("custom op: input is not contiguous"),
    }
}

/// Runs `f(first_row, rows)` over blocks of whole rows of `out` on candle's thread count.
/// Small jobs stay on the calling thread: handing them out costs more than they do.
///
/// The blocks run on rayon's pool, the one gemm runs candle's matmuls on: threads of our
/// own would be extra runnable threads beside rayon's idle-spinning ones, and on a
/// machine whose cores all train, the scheduler would preempt one for the other.
fn par_rows<T: Send>(out: &mut [T], row_len: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    let rows = out.len() / row_len.max(1);
    let threads = candle_core::utils::get_num_threads().min(rows).max(1);
    if threads == 1 || out.len() < 1 << 15 {
        f(0, out);
        return;
    }
    let per = rows.div_ceil(threads);
    out.par_chunks_mut(per * row_len)
        .enumerate()
        .for_each(|(i, chunk)| f(i * per, chunk));
}

/// A fresh `len`-value buffer that `f(first_row, rows)` writes whole, over the threads as
/// [`par_rows`] splits it, with no zero-fill first: head-split copies are a layer's
/// activations each, and a zero-fill is one more pass over them.
fn fresh_rows(
    len: usize,
    row_len: usize,
    f: impl Fn(usize, &mut [std::mem::MaybeUninit<f32>]) + Sync,
) -> Vec<f32> {
    let mut out = Vec::with_capacity(len);
    par_rows(&mut out.spare_capacity_mut()[..len], row_len, f);
    // SAFETY: `f` wrote every one of the `len` values (each caller writes each row whole).
    unsafe { out.set_len(len) };
    out
}

/// [`fresh_rows`] for a row function that writes an `&mut [f32]`: `f(row, out)` fills each
/// row in a scratch row, copied out, so the buffer is written once and not zero-filled.
fn fresh_each_row(len: usize, row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) -> Vec<f32> {
    fresh_rows(len, row_len, |first, chunk| {
        let mut row = vec![0f32; row_len];
        for (j, o) in chunk.chunks_mut(row_len).enumerate() {
            f(first + j, &mut row[..o.len()]);
            o.write_copy_of_slice(&row[..o.len()]);
        }
    })
}

struct RmsNorm {
    eps: f64,
}

fn inv_rms(x: &[f32], eps: f64) -> f32 {
    let ss: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (ss / x.len() as f32 + eps as f32).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-train"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        ws: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (rows_of(xs, lx)?, rows_of(ws, lw)?);
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |first, chunk| {
            for (j, o) in chunk.chunks_mut(d).enumerate() {
                let xr = &x[(first + j) * d..][..d];
                let r = inv_rms(xr, self.eps);
                for ((o, &xv), &wv) in o.iter_mut().zip(xr).zip(w) {
                    // transformers: weight * (x * rsqrt(var + eps)), in that order.
                    *o = wv * (xv * r);
                }
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        // Norm weights are frozen in LoRA: only pay for dw when someone wants it.
        let want_dw = w.track_op();
        let d = w.elem_count();
        let n = x.elem_count() / d.max(1);
        let packed = x.apply_op3_no_bwd(
            w,
            &g.contiguous()?,
            &RmsNormBwd {
                eps: self.eps,
                want_dw,
            },
        )?;
        let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let dw = if want_dw {
            Some(packed.narrow(0, n, 1)?.reshape(d)?)
        } else {
            None
        };
        Ok((Some(dx), dw))
    }
}

/// Gradients of RMSNorm, packed as `(n + 1, d)`: dx rows, then dw when asked for.
/// dx = r·g·w − x·r³·Σ(g·w·x)/d, dw = Σ_rows g·x·r.
struct RmsNormBwd {
    eps: f64,
    want_dw: bool,
}

impl CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-train-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        ws: &CpuStorage,
        lw: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w, g) = (rows_of(xs, lx)?, rows_of(ws, lw)?, rows_of(gs, lg)?);
        let d = w.len();
        let n = x.len() / d;
        let extra = usize::from(self.want_dw);
        let mut out = vec![0f32; (n + extra) * d];
        let (dx, dw) = out.split_at_mut(n * d);
        par_rows(dx, d, |first, chunk| {
            for (j, o) in chunk.chunks_mut(d).enumerate() {
                let xr = &x[(first + j) * d..][..d];
                let gr = &g[(first + j) * d..][..d];
                let r = inv_rms(xr, self.eps);
                let dot: f32 = gr.iter().zip(w).zip(xr).map(|((g, w), x)| g * w * x).sum();
                let c = r * r * r * dot / d as f32;
                for (((o, &gv), &wv), &xv) in o.iter_mut().zip(gr).zip(w).zip(xr) {
                    *o = r * gv * wv - xv * c;
                }
            }
        });
        if self.want_dw {
            for (xr, gr) in x.chunks(d).zip(g.chunks(d)) {
                let r = inv_rms(xr, self.eps);
                for ((o, &gv), &xv) in dw.iter_mut().zip(gr).zip(xr) {
                    *o += gv * xv * r;
                }
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((n + extra, d))))
    }
}

/// Half-split rotary embedding on contiguous `(b, h, t, d)`; `sign = -1` is the inverse
/// rotation, which is also the backward of the forward one.
struct Rope {
    tables: RopeTables,
    sign: f32,
}

impl CustomOp1 for Rope {
    fn name(&self) -> &'static str {
        "rope-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(s, l)?;
        let d = 2 * self.tables.half;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |first, chunk| {
            for (j, o) in chunk.chunks_mut(d).enumerate() {
                let row = first + j;
                let xr = &x[row * d..][..d];
                self.tables.rotate(row, self.sign, xr, o);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let inverse = Rope {
            tables: self.tables.clone(),
            sign: -self.sign,
        };
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&inverse)?))
    }
}

/// `softmax(x · scale + mask)` over the last dim; the mask, when present, is `(b, t, tk)`
/// rows shared by every head of `(b, h, t, tk)` scores.
struct Softmax {
    scale: f32,
    mask: Option<AttnMask>,
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "softmax-train"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(s, l)?;
        let dims = l.dims();
        let k = *dims.last().unwrap_or(&1);
        let (heads, t) = if dims.len() == 4 {
            (dims[1], dims[2])
        } else {
            (1, 1)
        };
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, k, |first, chunk| {
            for (j, o) in chunk.chunks_mut(k).enumerate() {
                let row = first + j;
                let xr = &x[row * k..][..k];
                match &self.mask {
                    Some(m) => {
                        let (bi, i) = (row / (heads * t), row % t);
                        let mr = &m.rows[(bi * t + i) * k..][..k];
                        for ((o, &xv), &mv) in o.iter_mut().zip(xr).zip(mr) {
                            *o = xv * self.scale + mv;
                        }
                    }
                    None if self.scale == 1.0 => o.copy_from_slice(xr),
                    None => o.iter_mut().zip(xr).for_each(|(o, &v)| *o = v * self.scale),
                }
                softmax_in_place(o);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = SoftmaxBwd { scale: self.scale };
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// dx = scale · y·(g − Σ g·y).
struct SoftmaxBwd {
    scale: f32,
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-train-bwd"
    }

    fn cpu_fwd(
        &self,
        ys: &CpuStorage,
        ly: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, g) = (rows_of(ys, ly)?, rows_of(gs, lg)?);
        let k = *ly.dims().last().unwrap_or(&1);
        let mut out = vec![0f32; y.len()];
        par_rows(&mut out, k, |first, chunk| {
            for (j, o) in chunk.chunks_mut(k).enumerate() {
                let yr = &y[(first + j) * k..][..k];
                let gr = &g[(first + j) * k..][..k];
                let dot: f32 = yr.iter().zip(gr).map(|(y, g)| y * g).sum();
                for ((o, &yv), &gv) in o.iter_mut().zip(yr).zip(gr) {
                    *o = self.scale * yv * (gv - dot);
                }
            }
        });
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }
}

struct CrossEntropy {
    targets: Arc<Vec<u32>>,
}

/// A row of (scaled, masked) scores into its max-subtracted softmax.
fn softmax_in_place(row: &mut [f32]) {
    vmath::softmax_in_place(row);
}

use vmath::log_sum_exp;

impl CustomOp1 for CrossEntropy {
    fn name(&self) -> &'static str {
        "cross-entropy-rows"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(s, l)?;
        let (n, v) = l.shape().dims2()?;
        let mut out = vec![0f32; n];
        // One value per row: parallelise over rows by hand, `par_rows` wants long rows.
        let threads = candle_core::utils::get_num_threads().clamp(1, n.max(1));
        let per = n.div_ceil(threads).max(1);
        out.par_chunks_mut(per).enumerate().for_each(|(ci, chunk)| {
            for (j, o) in chunk.iter_mut().enumerate() {
                let row = ci * per + j;
                let xr = &x[row * v..][..v];
                let (max, lse) = log_sum_exp(xr);
                // As log_softmax does it: -((x_t − max) − ln Σ).
                *o = -((xr[self.targets[row] as usize] - max) - lse);
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = CrossEntropyBwd {
            targets: self.targets.clone(),
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

/// dlogits = (softmax(x) − onehot(target)) · g_row, with the softmax recomputed row by
/// row rather than kept from the forward pass.
struct CrossEntropyBwd {
    targets: Arc<Vec<u32>>,
}

impl CustomOp2 for CrossEntropyBwd {
    fn name(&self) -> &'static str {
        "cross-entropy-rows-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (rows_of(xs, lx)?, rows_of(gs, lg)?);
        let (_n, v) = lx.shape().dims2()?;
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, v, |first, chunk| {
            for (j, o) in chunk.chunks_mut(v).enumerate() {
                let row = first + j;
                let xr = &x[row * v..][..v];
                let (max, lse) = log_sum_exp(xr);
                let gv = g[row];
                // (softmax − onehot) · g, the softmax as e^(log_softmax) the way torch's
                // backward rounds it, with libm's exponential: vmath's, within 2 ulp of it,
                // doubled tiny-gemma2's distance from PEFT after 5 AdamW steps (1.1e-3), as
                // Adam turns any change of a near-zero gradient into a full-size step.
                for (o, &xv) in o.iter_mut().zip(xr) {
                    *o = ((xv - max) - lse).exp() * gv;
                }
                o[self.targets[row] as usize] -= gv;
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
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
        let y1 = frozen_linear(x.as_tensor(), &Frozen::from(w.clone()))?;
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

    /// `frozen_linear_bias` is `x·Wᵀ + b` in one op, to the bit, with `x`'s gradient; a
    /// bias that trains keeps its gradient (the composed way), and large outputs go through
    /// the threaded bias loop.
    #[test]
    fn frozen_linear_bias_is_the_product_plus_the_bias() -> Result<()> {
        let dev = Device::Cpu;
        for (n, k, m) in [(4, 3, 5), (300, 16, 200)] {
            let w = Tensor::randn(0f32, 1., (m, k), &dev)?;
            let b = Tensor::randn(0f32, 1., m, &dev)?;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., (n, k), &dev)?)?;
            let wf = Frozen::from(w.clone());
            let y1 = frozen_linear_bias(x.as_tensor(), &wf, Some(&b))?;
            let y2 = frozen_linear(x.as_tensor(), &wf)?.broadcast_add(&b)?;
            assert_eq!(y1.to_vec2::<f32>()?, y2.to_vec2::<f32>()?, "{n}x{k}x{m}");
            let r = Tensor::randn(0f32, 1., (n, m), &dev)?;
            let g1 = (&y1 * &r)?.sum_all()?.backward()?;
            let g2 = (&y2 * &r)?.sum_all()?.backward()?;
            let (g1, g2) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert_eq!(g1.to_vec2::<f32>()?, g2.to_vec2::<f32>()?);
        }
        let w = Frozen::from(Tensor::randn(0f32, 1., (5, 3), &dev)?);
        let x = Tensor::randn(0f32, 1., (4, 3), &dev)?;
        let b = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev)?)?;
        let g = frozen_linear_bias(&x, &w, Some(b.as_tensor()))?
            .sum_all()?
            .backward()?;
        let gb = g
            .get(b.as_tensor())
            .expect("a bias that trains gets its gradient");
        assert_eq!(gb.to_vec1::<f32>()?, vec![4f32; 5]);
        Ok(())
    }

    /// `add_frozen` is `broadcast_add` for every broadcast it takes (a bias over rows, a
    /// per-channel and a per-(image, channel) constant over images), the same values and
    /// input gradient, and leaves no gradient for the constant; a constant that trains, or
    /// a broadcast it does not take, goes to `broadcast_add`.
    #[test]
    fn add_frozen_is_broadcast_add_without_the_constants_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let cases: [(&[usize], &[usize], bool); 6] = [
            (&[6, 5], &[5], true),
            (&[2, 3, 4, 4], &[1, 3, 1, 1], true),
            (&[2, 3, 4, 4], &[2, 3, 1, 1], true),
            (&[2, 3, 4, 4], &[1], true),
            (&[2, 3, 4], &[3, 1], true),
            (&[2, 3, 4, 4], &[3, 1, 4], false),
        ];
        for (xs, cs, takes) in cases {
            assert_eq!(
                periodic_broadcast(xs, cs).is_some(),
                takes,
                "{xs:?} + {cs:?}"
            );
            let x = Var::from_tensor(&Tensor::randn(0f32, 1., xs, &dev)?)?;
            let c = Tensor::randn(0f32, 1., cs, &dev)?;
            let y1 = add_frozen(x.as_tensor(), &c)?;
            let y2 = x.as_tensor().broadcast_add(&c)?;
            let d = (&y1 - &y2)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert_eq!(d, 0.0, "{xs:?} + {cs:?}");
            // A loss with no other constant in it (a weighting would hold a gradient too).
            let g1 = y1.sqr()?.sum_all()?.backward()?;
            let g2 = y2.sqr()?.sum_all()?.backward()?;
            let (a, b) = (
                g1.get(x.as_tensor()).unwrap(),
                g2.get(x.as_tensor()).unwrap(),
            );
            assert_eq!((a - b)?.abs()?.max_all()?.to_scalar::<f32>()?, 0.0);
            // Only x (and, through broadcast_add, c's broadcast) hold gradients.
            assert_eq!(
                g1.get_ids().count(),
                if takes { 1 } else { 2 },
                "{xs:?} + {cs:?}"
            );
        }
        let x = Tensor::randn(0f32, 1., (4, 5), &dev)?;
        let c = Var::from_tensor(&Tensor::randn(0f32, 1., 5, &dev)?)?;
        let g = add_frozen(&x, c.as_tensor())?.sum_all()?.backward()?;
        let dc = g
            .get(c.as_tensor())
            .expect("a trained constant gets its gradient");
        assert_eq!(dc.to_vec1::<f32>()?, vec![4.0; 5]);
        Ok(())
    }

    #[test]
    fn frozen_conv2d_matches_candle_and_passes_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        // Stride 1 and 3x3 (resnets), stride 2 on odd and even sizes (downsamplers), 1x1;
        // 3x3 at stride 1 from 16x16 takes Winograd's F(2x2) and from 32x32 its F(4x4)
        // (even and odd sizes).
        for (k, padding, stride, hw) in [
            (3, 1, 1, 5),
            (3, 1, 2, 6),
            (3, 1, 2, 5),
            (1, 0, 1, 4),
            (3, 1, 1, 16),
            (3, 1, 1, 17),
            (3, 1, 1, 32),
            (3, 1, 1, 35),
        ] {
            let w = Tensor::from_vec(rand_vec(4 * 3 * k * k, 21), (4, 3, k, k), &dev)?;
            let x = rand_vec(2 * 3 * hw * hw, 22);
            let shape = [2, 3, hw, hw];
            let ours = |x: &Tensor| frozen_conv2d(x, &w, padding, stride);
            let candle = |x: &Tensor| x.conv2d(&w, padding, stride, 1, 1);
            let a = agree(&ours, &candle, x.clone(), &shape)?;
            assert!(a < 1e-5, "k {k} stride {stride} size {hw}: {a}");
            // Central differences cost two convolutions per input value: the small sizes
            // check the gradient's formula, `agree` holds the large ones to candle's.
            if hw < 32 {
                let fd = fd_error(&ours, x, &shape)?;
                assert!(fd < 2e-3, "k {k} stride {stride} size {hw}: fd {fd}");
            }
        }
        // The kernel gets no gradient entry.
        let w = Tensor::from_vec(rand_vec(4 * 3 * 9, 23), (4, 3, 3, 3), &dev)?;
        let x = Var::from_tensor(&Tensor::from_vec(
            rand_vec(2 * 3 * 16, 24),
            (2, 3, 4, 4),
            &dev,
        )?)?;
        let g = frozen_conv2d(x.as_tensor(), &w, 1, 1)?
            .sum_all()?
            .backward()?;
        assert!(g.get(&w).is_none());
        assert!(g.get(x.as_tensor()).is_some());
        Ok(())
    }

    /// Seeded values in [-1, 1): test inputs must not change between runs.
    pub(super) fn rand_vec(n: usize, seed: u64) -> Vec<f32> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(-1f32..1.0)).collect()
    }

    /// Checks autograd's gradient of `L = Σ f(x)·r` against central differences (the loss
    /// summed in f64 on the host, so only the op's own f32 rounding is in the noise).
    /// Returns the worst error relative to the largest gradient entry.
    pub(super) fn fd_error(
        f: &dyn Fn(&Tensor) -> Result<Tensor>,
        x: Vec<f32>,
        shape: &[usize],
    ) -> Result<f64> {
        let dev = Device::Cpu;
        let var = Var::from_tensor(&Tensor::from_vec(x.clone(), shape, &dev)?)?;
        let y = f(var.as_tensor())?;
        let r = rand_vec(y.elem_count(), 99);
        let rt = Tensor::from_vec(r.clone(), y.shape(), &dev)?;
        let grads = (y * rt)?.sum_all()?.backward()?;
        let g: Vec<f32> = grads
            .get(var.as_tensor())
            .expect("no gradient reached the input")
            .flatten_all()?
            .to_vec1()?;
        let loss = |x: Vec<f32>| -> Result<f64> {
            let y: Vec<f32> = f(&Tensor::from_vec(x, shape, &dev)?)?
                .flatten_all()?
                .to_vec1()?;
            Ok(y.iter().zip(&r).map(|(&a, &b)| a as f64 * b as f64).sum())
        };
        let h = 1e-2f32;
        let scale = g.iter().fold(1e-3f32, |m, v| m.max(v.abs())) as f64;
        let mut worst = 0f64;
        for i in 0..x.len() {
            let (mut up, mut down) = (x.clone(), x.clone());
            up[i] += h;
            down[i] -= h;
            let fd = (loss(up)? - loss(down)?) / (2.0 * h as f64);
            worst = worst.max((fd - g[i] as f64).abs() / scale);
        }
        Ok(worst)
    }

    /// Worst relative difference of outputs and input gradients between two formulations.
    pub(super) fn agree(
        a: &dyn Fn(&Tensor) -> Result<Tensor>,
        b: &dyn Fn(&Tensor) -> Result<Tensor>,
        x: Vec<f32>,
        shape: &[usize],
    ) -> Result<f64> {
        let dev = Device::Cpu;
        let run = |f: &dyn Fn(&Tensor) -> Result<Tensor>| -> Result<(Vec<f32>, Vec<f32>)> {
            let var = Var::from_tensor(&Tensor::from_vec(x.clone(), shape, &dev)?)?;
            let y = f(var.as_tensor())?;
            let r = Tensor::from_vec(rand_vec(y.elem_count(), 7), y.shape(), &dev)?;
            let g = (&y * r)?.sum_all()?.backward()?;
            Ok((
                y.flatten_all()?.to_vec1()?,
                g.get(var.as_tensor()).unwrap().flatten_all()?.to_vec1()?,
            ))
        };
        let ((ya, ga), (yb, gb)) = (run(a)?, run(b)?);
        let rel = |p: &[f32], q: &[f32]| {
            let m = q.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            p.iter().zip(q).fold(0f32, |w, (a, b)| w.max((a - b).abs())) / m
        };
        Ok(rel(&ya, &yb).max(rel(&ga, &gb)) as f64)
    }

    #[test]
    fn lora_linear_matches_the_graph_formulation() -> Result<()> {
        let dev = Device::Cpu;
        let (n, inp, out, r) = (5usize, 6usize, 7usize, 3usize);
        let w = Tensor::from_vec(rand_vec(out * inp, 11), (out, inp), &dev)?;
        let wf = Frozen::from(w.clone());
        let bias = Tensor::from_vec(rand_vec(out, 12), out, &dev)?;
        let a = Tensor::from_vec(rand_vec(r * inp, 13), (r, inp), &dev)?;
        let b = Var::from_tensor(&Tensor::from_vec(rand_vec(out * r, 14), (out, r), &dev)?)?;
        let x = rand_vec(n * inp, 15);
        let fused = |x: &Tensor| {
            let xa = x.matmul(&a.t()?)?;
            lora_linear(x, &wf, Some(&bias), &xa, b.as_tensor(), 1.5)
        };
        let graph = |x: &Tensor| {
            let y = x.matmul(&w.t()?)?.broadcast_add(&bias)?;
            y + (x.matmul(&a.t()?)?.matmul(&b.as_tensor().t()?)? * 1.5)?
        };
        assert!(agree(&fused, &graph, x.clone(), &[n, inp])? < 1e-5);
        assert!(fd_error(&fused, x.clone(), &[n, inp])? < 2e-3);
        // And B's gradient, the one LoRA trains.
        let xt = Tensor::from_vec(x, (n, inp), &dev)?;
        let xa = xt.matmul(&a.t()?)?;
        let fb = |bt: &Tensor| lora_linear(&xt, &wf, Some(&bias), &xa, bt, 1.5);
        assert!(fd_error(&fb, rand_vec(out * r, 14), &[out, r])? < 2e-3);
        // B's gradient must not drag the forward graph along: the optimizer keeps it.
        let a_var = Var::from_tensor(&a)?;
        let xa = xt.matmul(&a_var.as_tensor().t()?)?;
        let y = lora_linear(&xt, &wf, None, &xa, b.as_tensor(), 1.5)?;
        let grads = y.sum_all()?.backward()?;
        assert!(!grads.get(b.as_tensor()).unwrap().track_op());
        Ok(())
    }

    /// The op over `(x, A, B)` against the graph formulation, through every gradient it
    /// returns (x, A, B), with a weighted loss; and x's gradient left out when x is a
    /// constant (a first layer's input), A's and B's still there.
    #[test]
    fn lora_linear_over_a_matches_the_graph_formulation_and_all_three_gradients() -> Result<()> {
        let dev = Device::Cpu;
        let (n, inp, out, r) = (37usize, 29usize, 41usize, 4usize);
        let t = |v: Vec<f32>, s: (usize, usize)| Tensor::from_vec(v, s, &dev);
        let w = t(rand_vec(out * inp, 31), (out, inp))?;
        let wf = Frozen::from(w.clone());
        let bias = Tensor::from_vec(rand_vec(out, 32), out, &dev)?;
        let weights = t(rand_vec(n * out, 33), (n, out))?;
        let run = |fused: bool| -> Result<Vec<Vec<f32>>> {
            let x = Var::from_tensor(&t(rand_vec(n * inp, 34), (n, inp))?)?;
            let a = Var::from_tensor(&t(rand_vec(r * inp, 35), (r, inp))?)?;
            let b = Var::from_tensor(&t(rand_vec(out * r, 36), (out, r))?)?;
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let y = if fused {
                lora_linear_a(xt, &wf, Some(&bias), at, bt, 1.7)?
            } else {
                let base = xt.matmul(&w.t()?)?.broadcast_add(&bias)?;
                (base + (xt.matmul(&at.t()?)?.matmul(&bt.t()?)? * 1.7)?)?
            };
            let g = (&y * &weights)?.sum_all()?.backward()?;
            let flat = |t: &Tensor| t.flatten_all()?.to_vec1::<f32>();
            Ok(vec![
                flat(&y)?,
                flat(g.get(xt).expect("dx"))?,
                flat(g.get(at).expect("dA"))?,
                flat(g.get(bt).expect("dB"))?,
            ])
        };
        let rel = |p: &[f32], q: &[f32]| {
            let m = q.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
            p.iter().zip(q).fold(0f32, |e, (a, b)| e.max((a - b).abs())) / m
        };
        let (got, want) = (run(true)?, run(false)?);
        for (what, (p, q)) in ["y", "dx", "dA", "dB"].iter().zip(got.iter().zip(&want)) {
            let err = rel(p, q);
            assert!(err < 1e-5, "{what}: {err:e}");
        }
        // A constant input: no gradient for it, A's and B's as before.
        let x = t(rand_vec(n * inp, 34), (n, inp))?;
        let a = Var::from_tensor(&t(rand_vec(r * inp, 35), (r, inp))?)?;
        let b = Var::from_tensor(&t(rand_vec(out * r, 36), (out, r))?)?;
        let y = lora_linear_a(&x, &wf, None, a.as_tensor(), b.as_tensor(), 1.7)?;
        let g = (&y * &weights)?.sum_all()?.backward()?;
        assert!(g.get(&x).is_none());
        let da = g
            .get(a.as_tensor())
            .expect("dA")
            .flatten_all()?
            .to_vec1::<f32>()?;
        assert!(rel(&da, &want[2]) < 1e-5);
        assert!(!g.get(b.as_tensor()).expect("dB").track_op());
        Ok(())
    }

    #[test]
    fn swiglu_backward_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let shape = [3usize, 5];
        let x: Vec<f32> = rand_vec(15, 21).iter().map(|v| v * 4.0).collect();
        let other = Tensor::from_vec(rand_vec(15, 22), &shape, &dev)?;
        // Through the gate, then through up.
        let fg = |g: &Tensor| swiglu(g, &other);
        assert!(fd_error(&fg, x.clone(), &shape)? < 2e-3);
        let slow_g = |g: &Tensor| candle_nn::ops::silu(g)? * &other;
        assert!(agree(&fg, &slow_g, x.clone(), &shape)? < 1e-5);
        let fu = |u: &Tensor| swiglu(&other, u);
        assert!(fd_error(&fu, x.clone(), &shape)? < 2e-3);
        let slow_u = |u: &Tensor| candle_nn::ops::silu(&other)? * u;
        assert!(agree(&fu, &slow_u, x, &shape)? < 1e-5);
        Ok(())
    }

    #[test]
    fn rms_norm_backward_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let shape = [3usize, 16];
        let x = rand_vec(48, 1);
        let w = Tensor::from_vec(rand_vec(16, 2), 16, &dev)?;
        let fx = |x: &Tensor| rms_norm(x, &w, 1e-5);
        assert!(fd_error(&fx, x.clone(), &shape)? < 2e-3);
        let slow = |x: &Tensor| rms_norm_primitive(x, &w, 1e-5);
        assert!(agree(&fx, &slow, x.clone(), &shape)? < 1e-5);
        // The weight gradient, when the weight is trained.
        let xt = Tensor::from_vec(x, &shape, &dev)?;
        let fw = |w: &Tensor| rms_norm(&xt, w, 1e-5);
        assert!(fd_error(&fw, rand_vec(16, 2), &[16])? < 2e-3);
        let slow_w = |w: &Tensor| rms_norm_primitive(&xt, w, 1e-5);
        assert!(agree(&fw, &slow_w, rand_vec(16, 2), &[16])? < 1e-5);
        Ok(())
    }

    #[test]
    fn softmax_backward_matches_finite_differences() -> Result<()> {
        let shape = [2usize, 3, 7];
        let x: Vec<f32> = rand_vec(42, 3).iter().map(|v| v * 3.0).collect();
        assert!(fd_error(&|x| softmax_last(x), x.clone(), &shape)? < 2e-3);
        assert!(agree(&|x| softmax_last(x), &softmax_primitive, x, &shape)? < 1e-5);
        Ok(())
    }

    #[test]
    fn masked_softmax_backward_matches_finite_differences() -> Result<()> {
        let (b, h, t) = (2usize, 2usize, 4usize);
        let mut m = vec![0f32; b * t * t];
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    // Causal, and the second sequence has its first key padded.
                    if j > i || (bi == 1 && j == 0 && i > 0) {
                        m[(bi * t + i) * t + j] = -1e30;
                    }
                }
            }
        }
        let mask = AttnMask::new(m, b, t, t, &Device::Cpu)?;
        let shape = [b, h, t, t];
        let x: Vec<f32> = rand_vec(b * h * t * t, 4).iter().map(|v| v * 3.0).collect();
        let fused = |x: &Tensor| masked_softmax(x, 0.5, &mask);
        assert!(fd_error(&fused, x.clone(), &shape)? < 2e-3);
        let slow = |x: &Tensor| softmax_primitive(&(x * 0.5)?.broadcast_add(&mask.tensor)?);
        assert!(agree(&fused, &slow, x, &shape)? < 1e-5);
        Ok(())
    }

    #[test]
    fn rope_backward_matches_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        let (t, half) = (3usize, 4usize);
        let ang = Tensor::from_vec(rand_vec(t * half, 5), (t, half), &dev)?;
        let ang = (ang * 3.0)?;
        let (cos, sin) = (ang.cos()?, ang.sin()?);
        let shape = [2usize, 2, t, 2 * half];
        let x = rand_vec(2 * 2 * t * 2 * half, 6);
        let fused = |x: &Tensor| rope(x, &cos, &sin);
        assert!(fd_error(&fused, x.clone(), &shape)? < 2e-3);
        let slow = |x: &Tensor| rope_primitive(x, &cos, &sin);
        assert!(agree(&fused, &slow, x, &shape)? < 1e-6);
        Ok(())
    }

    #[test]
    fn cross_entropy_backward_matches_finite_differences() -> Result<()> {
        let shape = [3usize, 11];
        let targets = [0u32, 7, 10];
        let x: Vec<f32> = rand_vec(33, 8).iter().map(|v| v * 4.0).collect();
        let fused = |x: &Tensor| cross_entropy_rows(x, &targets);
        assert!(fd_error(&fused, x.clone(), &shape)? < 2e-3);
        let slow = |x: &Tensor| {
            let lp = candle_nn::ops::log_softmax(x, D::Minus1)?;
            let tgt = Tensor::new(&targets, x.device())?.reshape((3, 1))?;
            lp.gather(&tgt, 1)?.squeeze(1)?.neg()
        };
        assert!(agree(&fused, &slow, x, &shape)? < 1e-5);
        assert!(cross_entropy_rows(
            &Tensor::zeros((3, 11), DType::F32, &Device::Cpu)?,
            &[0, 1, 11]
        )
        .is_err());
        Ok(())
    }
}
