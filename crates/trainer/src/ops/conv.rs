//! 2-D convolutions (groups 1, square kernels) as im2col plus one GEMM per image, on
//! the CPU in f32: a frozen one, differentiated for its input only, and a trainable
//! one (a conv LoRA's A), differentiated for its input and its kernel. The frozen 3×3,
//! stride-1 ones on planes of 16×16 and more go through Winograd's transforms instead
//! (`winograd.rs`), forward and back.
//!
//! candle's tiled convolution gathers its patches pixel by pixel; its backward goes
//! through `conv_transpose2d` (which took most of an SD step) and keeps a kernel
//! gradient for every frozen convolution. Other devices and dtypes take candle's ops.

use super::{fast_path, matmul, par_rows, rows_of, winograd};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Storage, Tensor};

/// The sizes one convolution works with.
#[derive(Clone, Copy)]
struct Geom {
    cin: usize,
    h: usize,
    w: usize,
    k: usize,
    p: usize,
    st: usize,
    ho: usize,
    wo: usize,
}

impl Geom {
    fn new(x: &Shape, kernel: &[usize], padding: usize, stride: usize) -> Result<Self> {
        let (_, cin, h, w) = x.dims4()?;
        let [_, kcin, k, kw] = kernel else {
            candle_core::bail!("conv2d: a kernel of shape {kernel:?} is not 4-D")
        };
        if *kcin != cin || *kw != *k {
            candle_core::bail!("conv2d: input has {cin} channels, the kernel is {kernel:?}");
        }
        let (k, p, st) = (*k, padding, stride);
        if h + 2 * p < k || w + 2 * p < k {
            candle_core::bail!("conv2d: a {k}x{k} kernel does not fit a {h}x{w} input");
        }
        let (ho, wo) = ((h + 2 * p - k) / st + 1, (w + 2 * p - k) / st + 1);
        Ok(Self {
            cin,
            h,
            w,
            k,
            p,
            st,
            ho,
            wo,
        })
    }
    fn ckk(&self) -> usize {
        self.cin * self.k * self.k
    }
    fn hw(&self) -> usize {
        self.ho * self.wo
    }
    /// Winograd's transforms take 3×3 kernels at stride 1 with one pixel of padding (the
    /// output the input's size) on planes of at least 16×16: below that its products are
    /// too thin for gemm and the kernel's transform costs what it saves.
    fn winograd(&self) -> Option<winograd::Tiles> {
        (self.k == 3 && self.st == 1 && self.p == 1 && self.h * self.w >= 256)
            .then(|| winograd::Tiles::new(self.h, self.w))
    }

    /// A 1×1 kernel at stride 1 without padding multiplies the input itself.
    fn direct(&self) -> bool {
        self.k == 1 && self.st == 1 && self.p == 0
    }

    /// One image's im2col matrix `(in·k·k, out_h·out_w)`, built one shifted input row at
    /// a time.
    fn im2col(&self, image: &[f32]) -> Vec<f32> {
        if self.direct() {
            return image.to_vec();
        }
        let Geom {
            h,
            w,
            k,
            p,
            st,
            ho,
            wo,
            ..
        } = *self;
        let hw = self.hw();
        let mut cols = vec![0f32; self.ckk() * hw];
        par_rows(&mut cols, hw, |first, chunk| {
            for (j, row) in chunk.chunks_mut(hw).enumerate() {
                let r = first + j;
                let (c, ki, kj) = (r / (k * k), (r / k) % k, r % k);
                let plane = &image[c * h * w..][..h * w];
                for oy in 0..ho {
                    let iy = (oy * st + ki) as isize - p as isize;
                    if iy < 0 || iy >= h as isize {
                        continue;
                    }
                    let src = &plane[iy as usize * w..][..w];
                    let dst = &mut row[oy * wo..][..wo];
                    for (ox, d) in dst.iter_mut().enumerate() {
                        let ix = (ox * st + kj) as isize - p as isize;
                        if ix >= 0 && ix < w as isize {
                            *d = src[ix as usize];
                        }
                    }
                }
            }
        });
        cols
    }

    /// Adds an im2col-shaped gradient back onto one image's planes: each input channel
    /// gathers its `k·k` shifted rows.
    fn col2im(&self, cols: &[f32], planes: &mut [f32]) {
        let Geom {
            h,
            w,
            k,
            p,
            st,
            ho,
            wo,
            ..
        } = *self;
        let hw = self.hw();
        let (p, st) = (p as isize, st as isize);
        par_rows(planes, h * w, |first, chunk| {
            for (j, plane) in chunk.chunks_mut(h * w).enumerate() {
                let c = first + j;
                for ki in 0..k {
                    for kj in 0..k {
                        let row = &cols[((c * k + ki) * k + kj) * hw..][..hw];
                        for oy in 0..ho {
                            let y = oy as isize * st + ki as isize - p;
                            if y < 0 || y >= h as isize {
                                continue;
                            }
                            let (dst, src) =
                                (&mut plane[y as usize * w..][..w], &row[oy * wo..][..wo]);
                            for (ox, &v) in src.iter().enumerate() {
                                let x = ox as isize * st + kj as isize - p;
                                if x >= 0 && x < w as isize {
                                    dst[x as usize] += v;
                                }
                            }
                        }
                    }
                }
            }
        });
    }
}

fn cpu_f32(t: &Tensor) -> Result<(impl std::ops::Deref<Target = Storage> + '_, Layout)> {
    let (s, l) = t.storage_and_layout();
    if !matches!(&*s, Storage::Cpu(_)) {
        candle_core::bail!("conv2d: expected CPU storage")
    }
    Ok((s, l.clone()))
}

fn as_cpu(s: &Storage) -> &CpuStorage {
    match s {
        Storage::Cpu(c) => c,
        _ => unreachable!("checked by cpu_f32"),
    }
}

fn f32s(s: CpuStorage) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("conv2d: expected f32"),
    }
}

/// `Y = K · cols(X)` per image, with `K` the kernel as its `(out, in·k·k)` matrix: the
/// result is already the image's `(out, out_h, out_w)` output.
fn forward(x: &[f32], g: Geom, ks: &CpuStorage, kl: &Layout, cout: usize) -> Result<Vec<f32>> {
    let km = Layout::contiguous_with_offset((1, cout, g.ckk()), kl.start_offset());
    let mut y = Vec::with_capacity(x.len() / (g.cin * g.h * g.w) * cout * g.hw());
    for image in x.chunks(g.cin * g.h * g.w) {
        let cols = CpuStorage::F32(g.im2col(image));
        let out = matmul::matmul(
            ks,
            &cols,
            (1, cout, g.hw(), g.ckk()),
            &km,
            &Layout::contiguous((1, g.ckk(), g.hw())),
        )?;
        y.extend_from_slice(out.as_slice::<f32>()?);
    }
    Ok(y)
}

/// `dX` as col2im of `Kᵀ · g`, one GEMM per image over the kernel read transposed in
/// place.
fn input_grad(
    g: Geom,
    b: usize,
    ks: &CpuStorage,
    kl: &Layout,
    cout: usize,
    grad: &Tensor,
) -> Result<Vec<f32>> {
    let grad = grad.contiguous()?;
    let (gs, gl) = cpu_f32(&grad)?;
    let gs = as_cpu(&gs);
    let kt =
        Layout::contiguous_with_offset((1, cout, g.ckk()), kl.start_offset()).transpose(1, 2)?;
    let hw = g.hw();
    let mut dx = vec![0f32; b * g.cin * g.h * g.w];
    for (bi, planes) in dx.chunks_mut(g.cin * g.h * g.w).enumerate() {
        let gb = Layout::contiguous_with_offset((1, cout, hw), gl.start_offset() + bi * cout * hw);
        let cols = f32s(matmul::matmul(ks, gs, (1, g.ckk(), hw, cout), &kt, &gb)?)?;
        g.col2im(&cols, planes);
    }
    Ok(dx)
}

/// A frozen convolution: only `dX` on the way back (candle's own conv backward also
/// computes, and keeps until the step ends, a kernel gradient nobody reads: for an SD
/// 1.5 UNet that is 2.2 GB per step and most of the backward).
struct FrozenConv2d {
    w: Tensor,
    padding: usize,
    stride: usize,
}

impl CustomOp1 for FrozenConv2d {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(&self, xs: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let g = Geom::new(lx.shape(), self.w.dims(), self.padding, self.stride)?;
        let cout = self.w.dim(0)?;
        let (ws, wl) = cpu_f32(&self.w)?;
        let b = lx.shape().dims()[0];
        let y = match g.winograd() {
            Some(t) => {
                let k = winograd::Prepared::forward(rows_of(as_cpu(&ws), &wl)?, cout, g.cin, t);
                let mut y = vec![0f32; b * cout * g.hw()];
                for (image, out) in x.chunks(g.cin * g.h * g.w).zip(y.chunks_mut(cout * g.hw())) {
                    k.conv(image, out)?;
                }
                y
            }
            None => forward(x, g, as_cpu(&ws), &wl, cout)?,
        };
        Ok((CpuStorage::F32(y), Shape::from((b, cout, g.ho, g.wo))))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = Geom::new(arg.shape(), self.w.dims(), self.padding, self.stride)?;
        let b = arg.dim(0)?;
        let (ws, wl) = cpu_f32(&self.w)?;
        let cout = self.w.dim(0)?;
        let dx = match g.winograd() {
            Some(t) => {
                let k = winograd::Prepared::input_grad(rows_of(as_cpu(&ws), &wl)?, cout, g.cin, t);
                let grad = grad.contiguous()?;
                let (gs, gl) = cpu_f32(&grad)?;
                let gy = rows_of(as_cpu(&gs), &gl)?;
                let mut dx = vec![0f32; b * g.cin * g.h * g.w];
                for (gi, di) in gy
                    .chunks(cout * g.hw())
                    .zip(dx.chunks_mut(g.cin * g.h * g.w))
                {
                    k.conv(gi, di)?;
                }
                dx
            }
            None => input_grad(g, b, as_cpu(&ws), &wl, cout, grad)?,
        };
        Ok(Some(Tensor::from_vec(dx, arg.shape(), arg.device())?))
    }
}

/// `conv2d(x, W)` for a frozen `(out, in, k, k)` kernel, differentiable for `x` only.
/// Other devices and dtypes take candle's conv2d as [`conv2d`] does (correct, with the
/// wasted kernel gradient).
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = w.dims4()?;
    if !fast_path(x) || w.dtype() != candle_core::DType::F32 || kh != kw {
        return conv2d_generic(x, w, padding, stride);
    }
    x.contiguous()?.apply_op1(FrozenConv2d {
        w: w.contiguous()?,
        padding,
        stride,
    })
}

/// A convolution whose kernel trains: `dX` as the frozen one's, and `dK = Σ g · cols(X)ᵀ`
/// over the images, the im2col matrix built again rather than kept from the forward.
struct TrainConv2d {
    padding: usize,
    stride: usize,
}

impl CustomOp2 for TrainConv2d {
    fn name(&self) -> &'static str {
        "conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        lx: &Layout,
        ks: &CpuStorage,
        lk: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = rows_of(xs, lx)?;
        let g = Geom::new(lx.shape(), lk.dims(), self.padding, self.stride)?;
        let cout = lk.dims()[0];
        let y = forward(x, g, ks, lk, cout)?;
        let b = lx.shape().dims()[0];
        Ok((CpuStorage::F32(y), Shape::from((b, cout, g.ho, g.wo))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let g = Geom::new(x.shape(), kernel.dims(), self.padding, self.stride)?;
        let (b, cout, hw) = (x.dim(0)?, kernel.dim(0)?, g.hw());
        let x_shape = x.shape().clone();
        let (ks, kl) = cpu_f32(kernel)?;
        let dx = input_grad(g, b, as_cpu(&ks), &kl, cout, grad)?;
        let grad = grad.contiguous()?;
        let (gs, gl) = cpu_f32(&grad)?;
        let gs = as_cpu(&gs);
        let (xs, xl) = cpu_f32(x)?;
        let images = rows_of(as_cpu(&xs), &xl)?;
        let mut dk = vec![0f32; cout * g.ckk()];
        for (bi, image) in images.chunks(g.cin * g.h * g.w).enumerate() {
            let cols = CpuStorage::F32(g.im2col(image));
            let gb =
                Layout::contiguous_with_offset((1, cout, hw), gl.start_offset() + bi * cout * hw);
            let colst = Layout::contiguous((1, g.ckk(), hw)).transpose(1, 2)?;
            let part = f32s(matmul::matmul(
                gs,
                &cols,
                (1, cout, g.ckk(), hw),
                &gb,
                &colst,
            )?)?;
            for (d, p) in dk.iter_mut().zip(part) {
                *d += p;
            }
        }
        Ok((
            Some(Tensor::from_vec(dx, x_shape, kernel.device())?),
            Some(Tensor::from_vec(dk, kernel.shape(), kernel.device())?),
        ))
    }
}

/// `conv2d(x, k)` differentiable for both (a conv LoRA's A). On the CPU in f32 the
/// im2col op above. Elsewhere candle's conv2d, whose backward derives the input
/// gradient's output padding from the height alone: the input is first padded at the
/// bottom or right with zeros no window reaches, so that both sides leave the same
/// remainder.
pub fn conv2d(x: &Tensor, k: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = k.dims4()?;
    if fast_path(x) && k.dtype() == candle_core::DType::F32 && kh == kw {
        return x
            .contiguous()?
            .apply_op2(&k.contiguous()?, TrainConv2d { padding, stride });
    }
    conv2d_generic(x, k, padding, stride)
}

/// [`conv2d`] by candle's ops, for every device and dtype.
fn conv2d_generic(x: &Tensor, k: &Tensor, padding: usize, stride: usize) -> Result<Tensor> {
    let (_, _, kh, kw) = k.dims4()?;
    let (_, _, h, w) = x.dims4()?;
    let rem = |n: usize, k: usize| (n + 2 * padding).saturating_sub(k) % stride;
    let (rh, rw) = (rem(h, kh), rem(w, kw));
    let x = if rh > rw {
        x.pad_with_zeros(3, 0, rh - rw)?
    } else if rw > rh {
        x.pad_with_zeros(2, 0, rw - rh)?
    } else {
        x.clone()
    };
    x.conv2d(k, padding, stride, 1, 1)
}

/// Max pooling over `k`×`k` windows at stride `s`, padded by `p` on every side, as
/// PyTorch's `MaxPool2d(k, s, p)`. candle's own pooling has no backward unless the
/// window equals the stride, so this one is composed of ops that differentiate on every
/// device: the `k·k` strided views of the padded input, taken by reshaping, folded with
/// `maximum`. The padding repeats the edge (PyTorch pads with -inf): every window holds
/// its edge pixel already, so the maximum is the same, and a repeated pixel's gradient
/// flows back to it.
pub fn max_pool2d(x: &Tensor, k: usize, s: usize, p: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if k == 0 || s == 0 || h + 2 * p < k || w + 2 * p < k || p > k / 2 {
        candle_core::bail!("max_pool2d: a {k}x{k} window at stride {s}, padding {p} on {h}x{w}")
    }
    let (ho, wo) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
    // Window (i, j) starts at row i·s + di of the padded input; reading `s·ho` rows from
    // `di` needs `k - 1 + s·ho` rows, which the far side's padding supplies.
    let (hp, wp) = (k - 1 + s * ho, k - 1 + s * wo);
    let xp = x
        .pad_with_same(2, p, hp - h - p)?
        .pad_with_same(3, p, wp - w - p)?;
    let mut out: Option<Tensor> = None;
    for di in 0..k {
        let rows = xp
            .narrow(2, di, s * ho)?
            .contiguous()?
            .reshape((n, c, ho, s, wp))?
            .narrow(3, 0, 1)?
            .squeeze(3)?;
        for dj in 0..k {
            let v = rows
                .narrow(3, dj, s * wo)?
                .contiguous()?
                .reshape((n, c, ho, wo, s))?
                .narrow(4, 0, 1)?
                .squeeze(4)?;
            out = Some(match out {
                None => v,
                Some(m) => m.maximum(&v)?,
            });
        }
    }
    out.ok_or_else(|| candle_core::Error::Msg("max_pool2d: empty window".into()))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{agree, fd_error, rand_vec};
    use super::*;
    use candle_core::{Device, Var};

    /// The trainable convolution computes as candle's, and its input and kernel
    /// gradients pass central differences, on the CPU op and the generic path alike:
    /// 7×7 at stride 2, 3×3 at stride 1 and 2 (odd and even sizes, and a width whose
    /// remainder differs from the height's, where candle's own backward fails), 1×1.
    #[test]
    fn conv2d_matches_candle_and_passes_finite_differences() -> Result<()> {
        let dev = Device::Cpu;
        for (k, p, st, h, w) in [
            (3, 1, 1, 5, 5),
            (3, 1, 2, 6, 6),
            (3, 1, 2, 5, 8),
            (3, 1, 2, 8, 5),
            (7, 3, 2, 9, 8),
            (1, 0, 1, 4, 3),
        ] {
            let kernel = rand_vec(4 * 3 * k * k, 31);
            let x = rand_vec(2 * 3 * h * w, 32);
            let ks = [4, 3, k, k];
            let xs = [2, 3, h, w];
            let kt = Tensor::from_vec(kernel.clone(), &ks[..], &dev)?;
            let xt = Tensor::from_vec(x.clone(), &xs[..], &dev)?;
            let ours_x = |x: &Tensor| conv2d(x, &kt, p, st);
            if (h + 2 * p - k) % st == (w + 2 * p - k) % st {
                let candle = |x: &Tensor| x.conv2d(&kt, p, st, 1, 1);
                let a = agree(&ours_x, &candle, x.clone(), &xs)?;
                assert!(a < 1e-5, "k {k} stride {st} {h}x{w}: {a}");
            }
            let fd = fd_error(&ours_x, x, &xs)?;
            assert!(fd < 2e-3, "k {k} stride {st} {h}x{w}: input fd {fd}");
            let ours_k = |kk: &Tensor| conv2d(&xt, kk, p, st);
            let fd = fd_error(&ours_k, kernel.clone(), &ks)?;
            assert!(fd < 2e-3, "k {k} stride {st} {h}x{w}: kernel fd {fd}");
            // The generic path (other devices) computes the same values and gradients.
            let xv = Var::from_tensor(&xt)?;
            let kv = Var::from_tensor(&kt)?;
            let r = Tensor::from_vec(rand_vec(2 * 4 * 64, 33), 2 * 4 * 64, &dev)?;
            let loss = |y: Tensor| -> Result<Tensor> {
                let n = y.elem_count();
                (y.flatten_all()? * r.narrow(0, 0, n)?)?.sum_all()
            };
            let fast = conv2d(xv.as_tensor(), kv.as_tensor(), p, st)?;
            let generic = conv2d_generic(xv.as_tensor(), kv.as_tensor(), p, st)?;
            let d = (&fast - &generic)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "k {k} stride {st} {h}x{w}: generic values {d}");
            let gf = loss(fast)?.backward()?;
            let gg = loss(generic)?.backward()?;
            for v in [&xv, &kv] {
                let d = (gf.get(v.as_tensor()).unwrap() - gg.get(v.as_tensor()).unwrap())?
                    .abs()?
                    .max_all()?
                    .to_scalar::<f32>()?;
                assert!(d < 1e-4, "k {k} stride {st} {h}x{w}: generic gradients {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn max_pool_matches_a_direct_loop_with_its_gradient() {
        let (h, w) = (5, 8);
        let data: Vec<f32> = (0..2 * h * w)
            .map(|i| ((i * 37) % 23) as f32 * 0.1 - 1.0)
            .collect();
        let x = candle_core::Var::from_vec(data.clone(), (1, 2, h, w), &Device::Cpu).unwrap();
        let y = max_pool2d(x.as_tensor(), 3, 2, 1).unwrap();
        let (ho, wo) = (3, 4);
        assert_eq!(y.dims(), [1, 2, ho, wo]);
        let got: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        let mut grad = vec![0f32; data.len()];
        for c in 0..2 {
            for oy in 0..ho {
                for ox in 0..wo {
                    // PyTorch's rule: the first maximum in the window takes the gradient.
                    let mut best = (f32::NEG_INFINITY, 0);
                    for ky in 0..3 {
                        for kx in 0..3 {
                            let (iy, ix) = ((oy * 2 + ky) as isize - 1, (ox * 2 + kx) as isize - 1);
                            if iy < 0 || ix < 0 || iy >= h as isize || ix >= w as isize {
                                continue;
                            }
                            let at = (c * h + iy as usize) * w + ix as usize;
                            if data[at] > best.0 {
                                best = (data[at], at);
                            }
                        }
                    }
                    assert_eq!(got[(c * ho + oy) * wo + ox], best.0);
                    grad[best.1] += 1.0;
                }
            }
        }
        let g = y.sum_all().unwrap().backward().unwrap();
        let dx: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(dx, grad);
    }
}
