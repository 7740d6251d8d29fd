//! LayerNorm and GroupNorm (with the SiLU that follows it in a ResNet block) over frozen
//! weights, and the exact (erf) GELU, each one pass forward and one pass back on the CPU
//! in f32.
//!
//! Composed from candle's tensor ops, a LayerNorm is nine element-wise passes forward and
//! about twenty back, and candle's GELU backward twelve, each a full-size buffer and a
//! round through candle's element-wise thread pool: in an encoder step they took more
//! time than the matrix products (BENCHMARKS.md). The values are the composed ones: the
//! same formulas in the same order per element, sums over a row in a different order, and
//! the GELU's `erf` a vectorised one within 1.5 ulp of libm's (`vmath::erf`; libm's was a
//! tenth of an encoder step). A frozen norm's weights are captured by the op, not passed
//! to it: candle's backward of `y · w` computes a gradient for the broadcast `w` as large
//! as `y` whether or not anything reads it, and keeps it until the step ends (in an SD
//! 1.5 UNet step at 512 px, GroupNorm's and the biases' made up most of 983 MiB held).

use super::{fast_path, fresh_each_row, fresh_rows, par_rows, rows_of, vmath};
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor, D,
};
use std::sync::Arc;

/// `(x − mean) / √(var + eps) · w + b` over the last dim, with `w` and `b` frozen (a base
/// model's norm: no gradient reaches them). Weights that train take the composed path.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    match LayerNorm::fused(x, w, b, eps)? {
        Some(op) => x.contiguous()?.apply_op1(op),
        None => layer_norm_composed(x, w, b, eps),
    }
}

/// The same LayerNorm from candle's tensor ops (every device and dtype).
pub fn layer_norm_composed(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let y = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    y.broadcast_mul(w)?.broadcast_add(b)
}

/// The weights are shared with the backward op (`Arc`), not copied for every step.
struct LayerNorm {
    w: Arc<[f32]>,
    b: Arc<[f32]>,
    eps: f32,
}

/// A row's mean and `√(var + eps)`, as the composed op computes them but for the order of
/// each sum (over 16 lanes, then pairwise: a row's sums no longer wait on one another's
/// additions one at a time).
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let d = x.len() as f32;
    let mean = vmath::sum_and_sq_dev(x, 0.0).0 / d;
    let var = vmath::sum_and_sq_dev(x, mean).1 / d;
    (mean, (var + eps).sqrt())
}

impl LayerNorm {
    /// The fused op over `x`'s last dim, when it takes `x` (f32 on the CPU) and frozen f32
    /// `(d,)` weights; `None` sends the caller to the composed ops.
    fn fused(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Option<Self>> {
        let d = x.dim(D::Minus1)?;
        let frozen = !w.track_op() && !b.track_op();
        let f32s = w.dtype() == DType::F32 && b.dtype() == DType::F32;
        if !(fast_path(x) && frozen && f32s && d > 0 && w.dims() == [d] && b.dims() == [d]) {
            return Ok(None);
        }
        Ok(Some(LayerNorm {
            w: w.to_vec1::<f32>()?.into(),
            b: b.to_vec1::<f32>()?.into(),
            eps: eps as f32,
        }))
    }

    /// One normalised row `xr` into `o`.
    fn row(&self, o: &mut [f32], xr: &[f32]) {
        let (mean, s) = moments(xr, self.eps);
        vmath::layer_norm_row(o, xr, &self.w, &self.b, mean, s);
    }
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "layer-norm-frozen"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let d = self.w.len();
        let out = fresh_each_row(x.len(), d, |i, o| self.row(o, &x[i * d..][..d]));
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = LayerNormBwd {
            w: self.w.clone(),
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &back)?))
    }
}

/// `dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / √(var + eps)` with `ĝ = g·w`, `x̂` the normalised row.
struct LayerNormBwd {
    w: Arc<[f32]>,
    eps: f32,
}

impl CustomOp2 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-frozen-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (rows_of(xs, lx)?, rows_of(gs, lg)?);
        let d = self.w.len();
        let out = fresh_each_row(x.len(), d, |i, o| {
            self.row(o, &x[i * d..][..d], &g[i * d..][..d]);
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

impl LayerNormBwd {
    /// One row's `dx` into `o`, from its input row `xr` and gradient row `gr`.
    fn row(&self, o: &mut [f32], xr: &[f32], gr: &[f32]) {
        let (mean, s) = moments(xr, self.eps);
        vmath::layer_norm_row_bwd(o, xr, gr, &self.w, mean, s);
    }
}

/// `layer_norm(a + res, w, b, eps)`, a post-norm residual block's `LayerNorm(h + input)`
/// (BERT's), with the sum made row by row inside the op: the graph holds no `(n, d)` sum,
/// and candle's backward zero-fills and adds one gradient fewer. Both inputs get the
/// sum's gradient. The values are [`layer_norm`]'s of the composed sum, bit for bit.
pub fn layer_norm_residual(
    a: &Tensor,
    res: &Tensor,
    w: &Tensor,
    b: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let fused = match a.dims() == res.dims() && res.dtype() == DType::F32 {
        true => LayerNorm::fused(a, w, b, eps)?,
        false => None,
    };
    match fused {
        Some(op) => a
            .contiguous()?
            .apply_op2(&res.contiguous()?, LayerNormResidual(op)),
        None => layer_norm(&(a + res)?, w, b, eps),
    }
}

struct LayerNormResidual(LayerNorm);

/// A fresh buffer whose row `i` is `f(i, sum, out)` of the row sum `a[i] + r[i]` (as
/// candle's add makes it), each `d` wide: the residual norm's rows, both ways.
fn each_sum_row(
    a: &[f32],
    r: &[f32],
    d: usize,
    f: impl Fn(usize, &[f32], &mut [f32]) + Sync,
) -> Vec<f32> {
    fresh_rows(a.len(), d, |first, chunk| {
        let (mut s, mut y) = (vec![0f32; d], vec![0f32; d]);
        for (j, o) in chunk.chunks_mut(d).enumerate() {
            let i = first + j;
            for ((s, &av), &rv) in s.iter_mut().zip(&a[i * d..][..d]).zip(&r[i * d..][..d]) {
                *s = av + rv;
            }
            f(i, &s, &mut y);
            o.write_copy_of_slice(&y);
        }
    })
}

impl CustomOp2 for LayerNormResidual {
    fn name(&self) -> &'static str {
        "layer-norm-residual-frozen"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        la: &Layout,
        rs: &CpuStorage,
        lr: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, r) = (rows_of(as_, la)?, rows_of(rs, lr)?);
        let d = self.0.w.len();
        let out = each_sum_row(a, r, d, |_, s, y| self.0.row(y, s));
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        res: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let back = LayerNormResidualBwd(LayerNormBwd {
            w: self.0.w.clone(),
            eps: self.0.eps,
        });
        let ds = a.apply_op3_no_bwd(res, &g.contiguous()?, &back)?;
        Ok((Some(ds.clone()), Some(ds)))
    }
}

/// [`LayerNormBwd`] of the row sums `a + r`, made again row by row.
struct LayerNormResidualBwd(LayerNormBwd);

impl CustomOp3 for LayerNormResidualBwd {
    fn name(&self) -> &'static str {
        "layer-norm-residual-frozen-bwd"
    }

    fn cpu_fwd(
        &self,
        as_: &CpuStorage,
        la: &Layout,
        rs: &CpuStorage,
        lr: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (a, r, g) = (rows_of(as_, la)?, rows_of(rs, lr)?, rows_of(gs, lg)?);
        let d = self.0.w.len();
        let out = each_sum_row(a, r, d, |i, s, dx| self.0.row(dx, s, &g[i * d..][..d]));
        Ok((CpuStorage::F32(out), la.shape().clone()))
    }
}

/// `GroupNorm(x) · w + b` over `(b, c, …)` with frozen per-channel `w` and `b` (`c`
/// values each, any shape), then SiLU when `silu` (a ResNet block's `norm → silu`), as
/// diffusers computes it: each group's mean and `√(var + eps)` over its channels and
/// positions. Weights that train take the composed path.
pub fn group_norm(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let c = if x.rank() >= 2 { x.dim(1)? } else { 0 };
    let fits = c > 0 && groups > 0 && c.is_multiple_of(groups);
    let frozen = !w.track_op() && !b.track_op();
    let f32s = w.dtype() == DType::F32 && b.dtype() == DType::F32;
    if fast_path(x) && fits && frozen && f32s && w.elem_count() == c && b.elem_count() == c {
        let op = GroupNorm {
            w: w.flatten_all()?.to_vec1::<f32>()?.into(),
            b: b.flatten_all()?.to_vec1::<f32>()?.into(),
            groups,
            eps: eps as f32,
            silu,
        };
        return x.contiguous()?.apply_op1(op);
    }
    group_norm_composed(x, w, b, groups, eps, silu)
}

/// The same GroupNorm (and SiLU) from candle's tensor ops (every device and dtype).
pub fn group_norm_composed(
    x: &Tensor,
    w: &Tensor,
    b: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    if dims.len() < 2 || groups == 0 || !dims[1].is_multiple_of(groups) {
        candle_core::bail!("group norm: {groups} groups over an input of shape {dims:?}");
    }
    let mut per_channel = vec![1usize; dims.len()];
    per_channel[1] = dims[1];
    let xg = x.reshape((dims[0], groups, ()))?;
    let mean = xg.mean_keepdim(2)?;
    let xc = xg.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let y = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims)?
        .broadcast_mul(&w.reshape(per_channel.as_slice())?)?
        .broadcast_add(&b.reshape(per_channel.as_slice())?)?;
    if silu {
        y.silu()
    } else {
        Ok(y)
    }
}

/// The weights are shared with the backward op (`Arc`), not copied for every step.
struct GroupNorm {
    w: Arc<[f32]>,
    b: Arc<[f32]>,
    groups: usize,
    eps: f32,
    silu: bool,
}

impl GroupNorm {
    /// Runs `f(row, channel, norm)` over the `(batch, group)` rows of `out`: a row is the
    /// group's channels one after another, `positions` values each.
    fn rows(
        &self,
        out: &mut [f32],
        x: &[f32],
        positions: usize,
        f: impl Fn(&mut [f32], &[f32], usize, &mut dyn FnMut(usize) -> vmath::ChannelNorm) + Sync,
    ) {
        let c = self.w.len();
        let per_group = c / self.groups;
        let len = per_group * positions;
        par_rows(out, len, |first, chunk| {
            for (j, o) in chunk.chunks_mut(len).enumerate() {
                let row = first + j;
                let xr = &x[row * len..][..len];
                // The group's moments, as the composed op takes them: the mean, then
                // the mean square of the centred values.
                let n = len as f32;
                let mean = vmath::sum_and_sq_dev(xr, 0.0).0 / n;
                let var = vmath::sum_and_sq_dev(xr, mean).1 / n;
                let s = (var + self.eps).sqrt();
                let first_channel = (row % self.groups) * per_group;
                let mut norm = |k: usize| vmath::ChannelNorm {
                    mean,
                    s,
                    w: self.w[first_channel + k],
                    b: self.b[first_channel + k],
                };
                f(o, xr, row, &mut norm);
            }
        });
    }
}

impl CustomOp1 for GroupNorm {
    fn name(&self) -> &'static str {
        "group-norm-frozen"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let positions: usize = lx.dims()[2..].iter().product();
        let mut out = vec![0f32; x.len()];
        self.rows(&mut out, x, positions, |o, xr, _, norm| {
            for (k, (oc, xc)) in o
                .chunks_mut(positions)
                .zip(xr.chunks(positions))
                .enumerate()
            {
                vmath::norm_affine(oc, xc, norm(k), self.silu);
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let back = GroupNormBwd(GroupNorm {
            w: self.w.clone(),
            b: self.b.clone(),
            ..*self
        });
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &back)?))
    }
}

/// Per group, `dx = (ĝ − mean(ĝ) − x̂·mean(ĝ·x̂)) / √(var + eps)` with `ĝ = g'·w`, `g'`
/// the output gradient taken back through the SiLU (recomputed) when there is one.
struct GroupNormBwd(GroupNorm);

impl CustomOp2 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "group-norm-frozen-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (rows_of(xs, lx)?, rows_of(gs, lg)?);
        let positions: usize = lx.dims()[2..].iter().product();
        let mut out = vec![0f32; x.len()];
        let silu = self.0.silu;
        self.0.rows(&mut out, x, positions, |o, xr, row, norm| {
            let gr = &g[row * o.len()..][..o.len()];
            let (mut sg, mut sgx) = (0f32, 0f32);
            for (k, ((oc, xc), gc)) in o
                .chunks_mut(positions)
                .zip(xr.chunks(positions))
                .zip(gr.chunks(positions))
                .enumerate()
            {
                let (a, b) = vmath::norm_affine_bwd(oc, xc, gc, norm(k), silu);
                sg += a;
                sgx += b;
            }
            let n = o.len() as f32;
            let (mg, mgx) = (sg / n, sgx / n);
            for (k, (oc, xc)) in o
                .chunks_mut(positions)
                .zip(xr.chunks(positions))
                .enumerate()
            {
                vmath::norm_bwd_finish(oc, xc, norm(k), mg, mgx);
            }
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// transformers' `gelu`: `x · Φ(x)` with the exact normal CDF, `Φ(x) = (1 + erf(x/√2))/2`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) && x.rank() >= 1 {
        return x.contiguous()?.apply_op1(GeluErf);
    }
    x.gelu_erf()
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let d = lx.dims().last().copied().unwrap_or(1).max(1);
        Ok((CpuStorage::F32(gelu_erf_rows(x, d)), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(gelu_erf_bwd(x, g)?))
    }
}

/// The exact GELU's backward: `g · gelu'(x)` for same-shaped `x` and `g`.
pub(super) fn gelu_erf_bwd(x: &Tensor, g: &Tensor) -> Result<Tensor> {
    x.apply_op2_no_bwd(&g.contiguous()?, &GeluErfBwd)
}

/// `gelu(x)` of `(rows, d)` values into a fresh buffer (the forward of [`gelu_erf`]).
pub(super) fn gelu_erf_rows(x: &[f32], d: usize) -> Vec<f32> {
    // candle's formula, with an `erf` that vectorises (within 1.5 ulp of libm's).
    fresh_each_row(x.len(), d, |i, o| {
        vmath::gelu_erf(o, &x[i * d..][..o.len()])
    })
}

/// `g · (Φ(x) + x·φ(x))`, `φ(x) = e^(−x²/2)/√(2π)`.
struct GeluErfBwd;

impl CustomOp2 for GeluErfBwd {
    fn name(&self) -> &'static str {
        "gelu-erf-bwd"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, g) = (rows_of(xs, lx)?, rows_of(gs, lg)?);
        let d = lx.dims().last().copied().unwrap_or(1).max(1);
        let out = fresh_each_row(x.len(), d, |i, o| {
            let at = i * d..i * d + o.len();
            vmath::gelu_erf_bwd(o, &x[at.clone()], &g[at]);
        });
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// GEGLU as diffusers computes it: the last dim (`2k`) split in two, `h[…, :k] ·
/// gelu(h[…, k:])` with the exact GELU. One op forward and one back: composed, the two
/// halves are strided views, and each view's backward pads its gradient with zeros to
/// the whole width before the two are added (an SD 1.5 feed-forward at 512 px: five
/// 42 MB buffers a block). The values are the composed ones, bit for bit: the same
/// products per element.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    let d = h.dim(D::Minus1)?;
    if !d.is_multiple_of(2) {
        candle_core::bail!("geglu: the last dimension ({d}) does not split in two halves");
    }
    if fast_path(h) && d > 0 {
        return h.contiguous()?.apply_op1(Geglu);
    }
    geglu_composed(h)
}

/// The same GEGLU from candle's views and ops (every device and dtype).
pub fn geglu_composed(h: &Tensor) -> Result<Tensor> {
    let half = h.dim(D::Minus1)? / 2;
    h.narrow(D::Minus1, 0, half)? * gelu_erf(&h.narrow(D::Minus1, half, half)?)?
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, hs: &CpuStorage, lh: &Layout) -> Result<(CpuStorage, Shape)> {
        let h = rows_of(hs, lh)?;
        let d = lh.dims().last().copied().unwrap_or(0);
        let k = d / 2;
        let mut out = vec![0f32; h.len() / 2];
        par_rows(&mut out, k, |first, chunk| {
            for (j, o) in chunk.chunks_mut(k).enumerate() {
                let (a, x) = h[(first + j) * d..][..d].split_at(k);
                vmath::gelu_erf(o, x);
                o.iter_mut().zip(a).for_each(|(o, &a)| *o *= a);
            }
        });
        let mut dims = lh.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = k;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }

    fn bwd(&self, h: &Tensor, _res: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(h.apply_op2_no_bwd(&g.contiguous()?, &GegluBwd)?))
    }
}

/// `dh = [g · gelu(x), gelu'(x) · (g · a)]` for `h = [a, x]`, the products in the
/// composed backward's order.
struct GegluBwd;

impl CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "geglu-bwd"
    }

    fn cpu_fwd(
        &self,
        hs: &CpuStorage,
        lh: &Layout,
        gs: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (h, g) = (rows_of(hs, lh)?, rows_of(gs, lg)?);
        let d = lh.dims().last().copied().unwrap_or(0);
        let k = d / 2;
        let mut out = vec![0f32; h.len()];
        par_rows(&mut out, d, |first, chunk| {
            let mut ga = vec![0f32; k];
            for (j, o) in chunk.chunks_mut(d).enumerate() {
                let (a, x) = h[(first + j) * d..][..d].split_at(k);
                let gr = &g[(first + j) * k..][..k];
                let (da, dx) = o.split_at_mut(k);
                vmath::gelu_erf(da, x);
                da.iter_mut().zip(gr).for_each(|(o, &gv)| *o *= gv);
                ga.iter_mut()
                    .zip(gr.iter().zip(a))
                    .for_each(|(o, (&gv, &av))| *o = gv * av);
                vmath::gelu_erf_bwd(dx, x, &ga);
            }
        });
        Ok((CpuStorage::F32(out), lh.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn worst_rel(a: &Tensor, b: &Tensor) -> f32 {
        let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
        let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
        let m = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-12);
        a.iter()
            .zip(&b)
            .fold(0f32, |w, (x, y)| w.max((x - y).abs()))
            / m
    }

    /// Values and input gradients of the fused ops against the composed ones candle
    /// differentiates itself, on rows with a large mean (where a careless variance loses
    /// digits) and a weighted loss (so the gradient is not uniform).
    #[test]
    fn fused_layer_norm_and_gelu_match_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (3, 5, 48), &dev).unwrap() + 3.0).unwrap();
        let w = Tensor::randn(1f32, 0.3, 48, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 48, &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (3, 5, 48), &dev).unwrap();
        let run = |fused: bool| {
            let xv = Var::from_tensor(&x).unwrap();
            let (n, a) = if fused {
                let n = layer_norm(xv.as_tensor(), &w, &b, 1e-12).unwrap();
                (n.clone(), gelu_erf(&n).unwrap())
            } else {
                let n = layer_norm_composed(xv.as_tensor(), &w, &b, 1e-12).unwrap();
                (n.clone(), n.gelu_erf().unwrap())
            };
            let loss = (&a * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            (n, a, grads.get(xv.as_tensor()).unwrap().clone())
        };
        let (n1, a1, g1) = run(true);
        let (n0, a0, g0) = run(false);
        let (dn, da, dg) = (
            worst_rel(&n1, &n0),
            worst_rel(&a1, &a0),
            worst_rel(&g1, &g0),
        );
        println!("layer norm {dn:.2e}, gelu {da:.2e}, input gradient {dg:.2e}");
        assert!(dn < 1e-6 && da < 1e-6, "values: {dn:e}, {da:e}");
        assert!(dg < 1e-5, "input gradient: {dg:e}");
        // The fused GELU alone is candle's to within a few ulp (its own `erf`).
        let plain = x.gelu_erf().unwrap();
        let d = worst_rel(&gelu_erf(&x).unwrap(), &plain);
        assert!(d < 3e-7, "{d:e}");
    }

    /// A post-norm block's fused ops, `layer_norm_residual` and `gelu_frozen_linear`,
    /// against the composed ones candle differentiates itself: values, and the gradients
    /// of both residual inputs, at a row width with a tail past the 16 lanes and at
    /// MiniLM's (with rows enough to go to the threads).
    #[test]
    fn residual_layer_norm_and_gelu_linear_match_the_composed_ops() {
        use crate::ops::{frozen_linear_bias, gelu_frozen_linear, Frozen};
        let dev = Device::Cpu;
        for (rows, d) in [(7, 50), (64, 384)] {
            let randn = |s: f32, shape: (usize, usize)| Tensor::randn(0f32, s, shape, &dev);
            let (a, res) = (
                randn(2.0, (rows, d)).unwrap(),
                randn(1.0, (rows, d)).unwrap(),
            );
            let a = (a + 3.0).unwrap();
            let w = Tensor::randn(1f32, 0.3, d, &dev).unwrap();
            let b = Tensor::randn(0f32, 0.3, d, &dev).unwrap();
            let w1 = randn(0.05, (4 * d, d)).unwrap();
            let w2 = Frozen::from(randn(0.05, (d, 4 * d)).unwrap());
            let b2 = Tensor::randn(0f32, 0.3, d, &dev).unwrap();
            let weights = randn(1.0, (rows, d)).unwrap();
            let run = |fused: bool| {
                let (av, rv) = (
                    Var::from_tensor(&a).unwrap(),
                    Var::from_tensor(&res).unwrap(),
                );
                let (at, rt) = (av.as_tensor(), rv.as_tensor());
                let (n, y) = if fused {
                    let n = layer_norm_residual(at, rt, &w, &b, 1e-12).unwrap();
                    let h = n.matmul(&w1.t().unwrap()).unwrap();
                    (n, gelu_frozen_linear(&h, &w2, Some(&b2)).unwrap())
                } else {
                    let n = layer_norm_composed(&(at + rt).unwrap(), &w, &b, 1e-12).unwrap();
                    let h = n.matmul(&w1.t().unwrap()).unwrap();
                    let y = frozen_linear_bias(&h.gelu_erf().unwrap(), &w2, None).unwrap();
                    (n, y.broadcast_add(&b2).unwrap())
                };
                let grads = (&y * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                let g = |v: &Var| grads.get(v.as_tensor()).unwrap().clone();
                (n, y, g(&av), g(&rv))
            };
            let (n1, y1, ga1, gr1) = run(true);
            let (n0, y0, ga0, gr0) = run(false);
            let (dn, dy) = (worst_rel(&n1, &n0), worst_rel(&y1, &y0));
            let (dga, dgr) = (worst_rel(&ga1, &ga0), worst_rel(&gr1, &gr0));
            println!(
                "{rows}x{d}: norm {dn:.2e}, gelu linear {dy:.2e}, gradients {dga:.2e} {dgr:.2e}"
            );
            assert!(dn < 1e-6 && dy < 1e-5, "values: {dn:e}, {dy:e}");
            assert!(dga < 1e-5 && dgr < 1e-5, "gradients: {dga:e}, {dgr:e}");
            assert_eq!(ga1.to_vec2::<f32>().unwrap(), gr1.to_vec2::<f32>().unwrap());
        }
    }

    /// GroupNorm with and without the SiLU after it against the composed ops, values and
    /// input gradient, on groups with a large mean and channels of different scales.
    #[test]
    fn fused_group_norm_matches_the_composed_ops_and_their_gradients() {
        let dev = Device::Cpu;
        let x = (Tensor::randn(0f32, 2.0, (2, 12, 5, 7), &dev).unwrap() + 3.0).unwrap();
        let w = Tensor::randn(1f32, 0.3, 12, &dev).unwrap();
        let b = Tensor::randn(0f32, 0.3, 12, &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 12, 5, 7), &dev).unwrap();
        for silu in [false, true] {
            let run = |fused: bool| {
                let xv = Var::from_tensor(&x).unwrap();
                let y = if fused {
                    group_norm(xv.as_tensor(), &w, &b, 4, 1e-5, silu).unwrap()
                } else {
                    group_norm_composed(xv.as_tensor(), &w, &b, 4, 1e-5, silu).unwrap()
                };
                let loss = (&y * &weights).unwrap().sum_all().unwrap();
                let grads = loss.backward().unwrap();
                (y, grads.get(xv.as_tensor()).unwrap().clone())
            };
            let (y1, g1) = run(true);
            let (y0, g0) = run(false);
            let (dy, dg) = (worst_rel(&y1, &y0), worst_rel(&g1, &g0));
            println!("group norm (silu {silu}) {dy:.2e}, input gradient {dg:.2e}");
            assert!(dy < 1e-6, "values: {dy:e}");
            assert!(dg < 1e-5, "input gradient: {dg:e}");
        }
        // Trained weights, or a shape it does not fit, take the composed path.
        let wv = Var::from_tensor(&w).unwrap();
        let y = group_norm(&x, wv.as_tensor(), &b, 4, 1e-5, false).unwrap();
        let y0 = group_norm_composed(&x, &w, &b, 4, 1e-5, false).unwrap();
        assert!(worst_rel(&y, &y0) < 1e-6);
        assert!(group_norm(&x, &w, &b, 5, 1e-5, false).is_err());
    }

    /// GEGLU against its composed form (views of the two halves, candle's product and
    /// the GELU op): the same values and input gradient, bit for bit, on rows whose
    /// halves are not a multiple of the vector width; an odd width is refused.
    #[test]
    fn fused_geglu_is_the_composed_one_bit_for_bit() {
        let dev = Device::Cpu;
        let h = Tensor::randn(0f32, 2.0, (2, 7, 2 * 37), &dev).unwrap();
        let weights = Tensor::randn(0f32, 1.0, (2, 7, 37), &dev).unwrap();
        let run = |fused: bool| {
            let hv = Var::from_tensor(&h).unwrap();
            let y = if fused {
                geglu(hv.as_tensor()).unwrap()
            } else {
                geglu_composed(hv.as_tensor()).unwrap()
            };
            let grads = (&y * &weights)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let g = grads.get(hv.as_tensor()).unwrap().clone();
            let flat = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (y.dims().to_vec(), flat(&y), flat(&g))
        };
        let (d1, y1, g1) = run(true);
        let (d0, y0, g0) = run(false);
        assert_eq!(d1, [2, 7, 37]);
        assert_eq!(d1, d0);
        assert_eq!(y1, y0, "values");
        assert_eq!(g1, g0, "input gradient");
        let (first, second) = g1[..2 * 37].split_at(37);
        for half in [first, second] {
            assert!(half.iter().any(|v| *v != 0.0), "both halves get a gradient");
        }
        let odd = Tensor::zeros((3, 5), DType::F32, &dev).unwrap();
        assert!(geglu(&odd).unwrap_err().to_string().contains("(5)"));
    }
}
