//! Winograd's F(m×m, 3×3) for the frozen 3×3, stride-1, padding-1 convolutions that make
//! up most of a Stable Diffusion UNet: each `m×m` block of outputs from an `(m+2)×(m+2)`
//! block of input in `(m+2)²` products where direct convolution (im2col) takes `9·m²`.
//! F(4×4, 3×3) (36 products per 16 outputs: 1/4 of im2col's multiplications) on planes of
//! 32×32 and more, F(2×2, 3×3) (16 per 4: 4/9) below, where F(4×4)'s costlier transforms
//! take what its products save ([`Tiles::new`]).
//!
//! F(4×4)'s transforms (interpolation points 0, ±1, ±2) carry larger constants than
//! F(2×2)'s, and with them about ten times the rounding: ~1e-5 of the result's size in f32
//! at SD's 320 channels (measured against an f64 direct convolution), against ~1e-6 for
//! F(2×2) and for im2col. oneDNN uses the same F(4×4, 3×3) for its f32 convolutions.
//!
//! Layouts are chosen so that every transform runs along contiguous rows: the input's
//! transform is `[in][planes][tiles]` (one channel per task, the products read it as
//! matrices with a row stride of `planes·tiles`), the kernel's `[out][planes][in]`, and
//! the products' results `[planes][out][tiles]`, transformed back one output channel per
//! task. The input gradient is the same convolution of the output gradient with the
//! kernel flipped and its channels swapped ([`flipped_kernel`]).

use super::matmul;
use candle_core::{Layout, Result, Shape};
use rayon::prelude::*;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// The transforms' buffers, by role, kept from one convolution to the next.
#[derive(Clone, Copy)]
enum Slot {
    Kernel,
    Flipped,
    Input,
    Products,
}

thread_local! {
    /// Each role's largest buffer yet. The transforms of SD's 1,280- and 2,560-channel
    /// kernels take 100-200 MiB; a fresh buffer is zero-filled first (and page-faulted,
    /// where the allocator maps it anew), which took as long as the transform itself.
    /// Every value a convolution reads from these it has written first. The price: the
    /// largest of each kept for the thread's life (SD's peak RSS +0.8 GiB at 512 px).
    static POOL: RefCell<[Vec<f32>; 4]> = const { RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

/// A buffer from [`POOL`], returned to it when dropped.
pub(super) struct Scratch {
    slot: Slot,
    buf: Vec<f32>,
    len: usize,
}

impl Scratch {
    fn take(slot: Slot, len: usize) -> Scratch {
        let mut buf = POOL.with(|p| std::mem::take(&mut p.borrow_mut()[slot as usize]));
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        Scratch { slot, buf, len }
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.buf[..self.len]
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.buf[..self.len]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        POOL.with(|p| {
            let kept = &mut p.borrow_mut()[self.slot as usize];
            if buf.len() > kept.len() {
                *kept = buf;
            }
        });
    }
}

/// One F(m×m, 3×3): `bt` is `Bᵀ` (`a×a`, `a = m+2`), `g` is `G` (`a×3`), `at` is `Aᵀ`
/// (`m×a`), all row-major.
pub(super) struct Algo {
    m: usize,
    bt: &'static [f32],
    g: &'static [f32],
    at: &'static [f32],
}

impl Algo {
    fn a(&self) -> usize {
        self.m + 2
    }
    fn planes(&self) -> usize {
        self.a() * self.a()
    }
}

/// F(2×2, 3×3), points 0, ±1.
pub(super) const F2: Algo = Algo {
    m: 2,
    #[rustfmt::skip]
    bt: &[
        1.0, 0.0, -1.0, 0.0,
        0.0, 1.0, 1.0, 0.0,
        0.0, -1.0, 1.0, 0.0,
        0.0, 1.0, 0.0, -1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0, 0.0, 0.0,
        0.5, 0.5, 0.5,
        0.5, -0.5, 0.5,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, -1.0,
    ],
};

/// F(4×4, 3×3), points 0, ±1, ±2 (Lavin and Gray's).
pub(super) const F4: Algo = Algo {
    m: 4,
    #[rustfmt::skip]
    bt: &[
        4.0, 0.0, -5.0, 0.0, 1.0, 0.0,
        0.0, -4.0, -4.0, 1.0, 1.0, 0.0,
        0.0, 4.0, -4.0, -1.0, 1.0, 0.0,
        0.0, -2.0, -1.0, 2.0, 1.0, 0.0,
        0.0, 2.0, -1.0, -2.0, 1.0, 0.0,
        0.0, 4.0, 0.0, -5.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    g: &[
        1.0 / 4.0, 0.0, 0.0,
        -1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0,
        -1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0,
        1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0,
        1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0,
        0.0, 0.0, 1.0,
    ],
    #[rustfmt::skip]
    at: &[
        1.0, 1.0, 1.0, 1.0, 1.0, 0.0,
        0.0, 1.0, -1.0, 2.0, -2.0, 0.0,
        0.0, 1.0, 1.0, 4.0, 4.0, 0.0,
        0.0, 1.0, -1.0, 8.0, -8.0, 1.0,
    ],
};

/// The `m×m` tiles that cover an `h × w` plane, and the algorithm that computes them.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
    algo: &'static Algo,
}

impl Tiles {
    /// F(4×4) from 32×32 up, F(2×2) below. Measured on SD's convolutions (an Intel Xeon,
    /// 2 threads, kernel transform included): F(4×4) took 0.8× F(2×2)'s time at 320
    /// channels on 64×64, 0.86-0.92× at 640 on 32×32, and 1.6× at 1,280 on 16×16, where
    /// its transforms (36 planes against 16, 4 tiles per row) cost more than its
    /// products save.
    pub(super) fn new(h: usize, w: usize) -> Self {
        Self::with(if h * w >= 1024 { &F4 } else { &F2 }, h, w)
    }
    pub(super) fn with(algo: &'static Algo, h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            th: h.div_ceil(algo.m),
            tw: w.div_ceil(algo.m),
            algo,
        }
    }
    fn count(&self) -> usize {
        self.th * self.tw
    }
}

/// `dst = Σ coef[q]·rows[q]` along the rows, in one pass over them (each row as long as
/// `dst` is read). The rows are short (a plane's tile columns, 16 at 64×64 by F(4×4)), so
/// a pass per coefficient spent more in its loop's set-up than in its arithmetic.
fn combine(dst: &mut [f32], coef: &[f32], rows: &[&[f32]]) {
    match rows.len() {
        3 => combine_n::<3>(dst, coef, rows),
        4 => combine_n::<4>(dst, coef, rows),
        6 => combine_n::<6>(dst, coef, rows),
        n => unreachable!("Winograd combines 3, 4 or 6 rows, not {n}"),
    }
}

fn combine_n<const A: usize>(dst: &mut [f32], coef: &[f32], rows: &[&[f32]]) {
    let c: [f32; A] = std::array::from_fn(|q| coef[q]);
    let len = dst.len();
    let r: [&[f32]; A] = std::array::from_fn(|q| &rows[q][..len]);
    for (e, d) in dst.iter_mut().enumerate() {
        let mut s = 0.0;
        for q in 0..A {
            s += c[q] * r[q][e];
        }
        *d = s;
    }
}

/// The first `count` (at most `N`) rows `step` apart from the start of `x`, each running
/// to the end of `x` ([`combine`] reads as many values of each as its destination holds).
fn rows_apart<const N: usize>(x: &[f32], step: usize, count: usize) -> [&[f32]; N] {
    let mut rows: [&[f32]; N] = [&[]; N];
    for (q, row) in rows.iter_mut().enumerate().take(count) {
        *row = &x[q * step..];
    }
    rows
}

/// A `(out, in, 3, 3)` kernel flipped in both spatial directions with its channels
/// swapped, `(in, out, 3, 3)`: the kernel whose convolution of the output gradient is the
/// input gradient.
fn flipped_kernel(w: &[f32], cout: usize, cin: usize) -> Scratch {
    let mut f = Scratch::take(Slot::Flipped, cin * cout * 9);
    f.par_chunks_mut(cout * 9)
        .enumerate()
        .for_each(|(ci, row)| {
            for (co, taps) in row.chunks_exact_mut(9).enumerate() {
                let src = &w[(co * cin + ci) * 9..][..9];
                for (t, v) in taps.iter_mut().enumerate() {
                    *v = src[8 - t];
                }
            }
        });
    f
}

/// `U = G·g·Gᵀ` for every `(out, in)` pair of a `(out, in, 3, 3)` kernel, laid out
/// `[out][planes][in]`.
fn kernel_transform(w: &[f32], cout: usize, cin: usize, t: Tiles) -> Scratch {
    let (algo, a) = (t.algo, t.algo.a());
    let mut u = Scratch::take(Slot::Kernel, cout * algo.planes() * cin);
    u.par_chunks_mut(algo.planes() * cin)
        .zip(w.par_chunks(cin * 9))
        .for_each_init(
            || (vec![0f32; 9 * cin], vec![0f32; 3 * cin]),
            |(g, tmp), (out, kernel)| {
                // The nine taps as nine rows over the input channels, so that the
                // combinations below run along contiguous rows.
                for (ci, taps) in kernel.chunks_exact(9).enumerate() {
                    for (tap, &v) in taps.iter().enumerate() {
                        g[tap * cin + ci] = v;
                    }
                }
                // Row i of G·g (three rows over the channels, one per kernel column),
                // then G's rows along it for the planes (i, 0..a).
                for i in 0..a {
                    let gi = &algo.g[3 * i..][..3];
                    for b in 0..3 {
                        let taps = [0, 1, 2].map(|r| &g[(3 * r + b) * cin..][..cin]);
                        combine(&mut tmp[b * cin..][..cin], gi, &taps);
                    }
                    let cols = [0, 1, 2].map(|b| &tmp[b * cin..][..cin]);
                    for j in 0..a {
                        combine(
                            &mut out[(a * i + j) * cin..][..cin],
                            &algo.g[3 * j..][..3],
                            &cols,
                        );
                    }
                }
            },
        );
    u
}

/// `Bᵀ·d·B` for every tile of `c` planes of `h × w` (padded by one zero on every side),
/// laid out `[c][planes][tiles]`.
fn input_transform(x: &[f32], c: usize, t: Tiles) -> Scratch {
    let (algo, a, m) = (t.algo, t.algo.a(), t.algo.m);
    let (n, tw) = (t.count(), t.tw);
    let mut v = Scratch::take(Slot::Input, c * algo.planes() * n);
    // Each padded input row's `a` horizontal combinations, `[row][a][tw]`, then the
    // vertical ones over each tile's `a` rows.
    let rows = m * t.th + 2;
    v.par_chunks_mut(algo.planes() * n)
        .zip(x.par_chunks(t.h * t.w))
        .for_each_init(
            || {
                (
                    vec![0f32; rows * a * tw],
                    vec![0f32; m * tw + 2],
                    vec![0f32; a * tw],
                )
            },
            |(r, padded, phase), (out, plane)| {
                for pr in 0..rows {
                    let dst = &mut r[pr * a * tw..][..a * tw];
                    // Padded row `pr` is input row `pr - 1`.
                    if pr == 0 || pr > t.h {
                        dst.fill(0.0);
                        continue;
                    }
                    // Only columns 1..=w are ever written: both pads stay zero.
                    padded[1..=t.w].copy_from_slice(&plane[(pr - 1) * t.w..][..t.w]);
                    // Tile column `tx` reads padded columns m·tx … m·tx + a - 1: phase
                    // row q holds each tile's column q.
                    for (q, ph) in phase.chunks_exact_mut(tw).enumerate() {
                        for (tx, p) in ph.iter_mut().enumerate() {
                            *p = padded[m * tx + q];
                        }
                    }
                    let cols = rows_apart::<6>(phase, tw, a);
                    for (i, h) in dst.chunks_exact_mut(tw).enumerate() {
                        combine(h, &algo.bt[a * i..][..a], &cols[..a]);
                    }
                }
                for ty in 0..t.th {
                    for j in 0..a {
                        // Tile row ty's padded rows m·ty + q, their combination j.
                        let rows = rows_apart::<6>(&r[(m * ty * a + j) * tw..], a * tw, a);
                        for i in 0..a {
                            let dst = &mut out[(a * i + j) * n + ty * tw..][..tw];
                            combine(dst, &algo.bt[a * i..][..a], &rows[..a]);
                        }
                    }
                }
            },
        );
    v
}

/// `Aᵀ·M·A` for every tile of `[planes][c][tiles]` products, into `c` planes of `h × w`.
fn output_transform(mm: &[f32], c: usize, t: Tiles, y: &mut [f32]) {
    let (algo, a, m) = (t.algo, t.algo.a(), t.algo.m);
    let (n, tw) = (t.count(), t.tw);
    y.par_chunks_mut(t.h * t.w).enumerate().for_each_init(
        || {
            (
                vec![0f32; m * a * tw],
                vec![0f32; m * tw],
                vec![0f32; m * tw],
            )
        },
        |(s, cols, row), (co, plane)| {
            for ty in 0..t.th {
                // Down the tile's rows: s[i][j] = Σ_q Aᵀ[i][q]·M[(q, j)].
                for j in 0..a {
                    // Planes (q, j) for q in 0..a, `a·c·n` apart.
                    let planes = rows_apart::<6>(&mm[(j * c + co) * n + ty * tw..], a * c * n, a);
                    for i in 0..m {
                        combine(
                            &mut s[(i * a + j) * tw..][..tw],
                            &algo.at[a * i..][..a],
                            &planes[..a],
                        );
                    }
                }
                // Along them: output row m·ty + i, column m·tx + p = Σ_j Aᵀ[p][j]·s[i][j].
                for i in 0..m {
                    let oy = m * ty + i;
                    if oy >= t.h {
                        break;
                    }
                    let si = rows_apart::<6>(&s[i * a * tw..], tw, a);
                    for (p, col) in cols.chunks_exact_mut(tw).enumerate() {
                        combine(col, &algo.at[a * p..][..a], &si[..a]);
                    }
                    for (tx, out) in row.chunks_exact_mut(m).enumerate() {
                        for (p, o) in out.iter_mut().enumerate() {
                            *o = cols[p * tw + tx];
                        }
                    }
                    plane[oy * t.w..][..t.w].copy_from_slice(&row[..t.w]);
                }
            }
        },
    );
}

/// A kernel's transform, ready for one convolution per image: the forward one or the
/// input gradient's.
pub(super) struct Prepared {
    u: Scratch,
    /// The input gradient's by F(2×2): `u` is the forward kernel's transform, read with
    /// its planes flipped and transposed.
    flip: bool,
    cin: usize,
    cout: usize,
    t: Tiles,
}

impl Prepared {
    /// For `conv2d(x, w)`, `w` a `(cout, cin, 3, 3)` kernel, on planes tiled by `t`.
    pub(super) fn forward(w: &[f32], cout: usize, cin: usize, t: Tiles) -> Self {
        let u = kernel_transform(w, cout, cin, t);
        Self {
            u,
            flip: false,
            cin,
            cout,
            t,
        }
    }

    /// For the input gradient of `conv2d(x, w)`: a convolution of the output gradient's
    /// `cout` planes into `cin`. Flipping a 3×3 kernel reverses the rows of F(2×2)'s `G`
    /// but for its middle two (`G·J = P·G`, `P` swapping rows 0 and 3), so there the
    /// flipped kernel's transform is the forward one with planes `(i, j)` read as
    /// `(p(i), p(j))`, transposed in place; F(4×4)'s `G` has no such symmetry (its points
    /// ±2 would map to ±½), so its flipped kernel is transformed anew.
    pub(super) fn input_grad(w: &[f32], cout: usize, cin: usize, t: Tiles) -> Self {
        let flip = t.algo.m == 2;
        let u = if flip {
            kernel_transform(w, cout, cin, t)
        } else {
            kernel_transform(&flipped_kernel(w, cout, cin), cin, cout, t)
        };
        Self {
            u,
            flip,
            cin: cout,
            cout: cin,
            t,
        }
    }

    /// One image's 3×3, stride-1, padding-1 convolution of `cin` planes into `cout`
    /// planes of the same size.
    pub(super) fn conv(&self, x: &[f32], y: &mut [f32]) -> Result<()> {
        let Self {
            cin, cout, t, flip, ..
        } = *self;
        let (n, planes) = (t.count(), t.algo.planes());
        let v = input_transform(x, cin, t);
        let mut m = Scratch::take(Slot::Products, planes * cout * n);
        // Independent products, each on one thread: splitting each again would only add
        // a wait per product.
        m.par_chunks_mut(cout * n)
            .enumerate()
            .try_for_each(|(xi, mxi)| -> Result<()> {
                // The input's plane `xi`: `(cin, tiles)` rows `planes·tiles` apart.
                let lv = Layout::new(Shape::from((cin, n)), vec![planes * n, 1], xi * n);
                let lu = if flip {
                    // `u` is `[cin][planes][cout]` here; plane `flipped(xi)` transposed.
                    Layout::new(
                        Shape::from((cout, cin)),
                        vec![1, planes * cout],
                        flipped_f2(xi) * cout,
                    )
                } else {
                    Layout::new(Shape::from((cout, cin)), vec![planes * cin, 1], xi * cin)
                };
                matmul::matmul_into_on(1, mxi, false, &self.u, &lu, &v, &lv, (cout, n, cin))
            })?;
        output_transform(&m, cout, t, y);
        Ok(())
    }
}

/// Which plane of F(2×2)'s forward kernel transform the flipped kernel's plane `(i, j)`
/// is.
fn flipped_f2(xi: usize) -> usize {
    let p = |i: usize| match i {
        0 => 3,
        3 => 0,
        i => i,
    };
    4 * p(xi / 4) + p(xi % 4)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Direct 3×3 correlation with one zero of padding, in f64.
    fn direct(x: &[f32], w: &[f32], cin: usize, cout: usize, h: usize, wd: usize) -> Vec<f64> {
        let mut y = vec![0f64; cout * h * wd];
        for co in 0..cout {
            for ci in 0..cin {
                for oy in 0..h {
                    for ox in 0..wd {
                        let mut s = 0f64;
                        for a in 0..3 {
                            for b in 0..3 {
                                let (iy, ix) =
                                    (oy as isize + a as isize - 1, ox as isize + b as isize - 1);
                                if iy < 0 || ix < 0 || iy >= h as isize || ix >= wd as isize {
                                    continue;
                                }
                                s += x[(ci * h + iy as usize) * wd + ix as usize] as f64
                                    * w[((co * cin + ci) * 3 + a) * 3 + b] as f64;
                            }
                        }
                        y[(co * h + oy) * wd + ox] += s;
                    }
                }
            }
        }
        y
    }

    /// The forward and the flipped (input-gradient) convolutions agree with a direct
    /// f64 loop on even, odd and unequal sizes, one channel and several.
    #[test]
    fn winograd_matches_a_direct_convolution_and_its_transpose() -> Result<()> {
        let rand = super::super::tests::rand_vec;
        let sizes = [
            (3, 5, 6, 6),
            (4, 2, 5, 7),
            (1, 1, 1, 1),
            (7, 3, 9, 4),
            (2, 6, 2, 3),
            (5, 4, 11, 13),
            (3, 3, 8, 8),
        ];
        // F(4×4)'s larger constants round more: 1e-5 of the output's largest value, where
        // F(2×2) keeps within 1e-5 absolute as im2col does.
        for (algo, (cin, cout, h, w)) in [&F2, &F4]
            .into_iter()
            .flat_map(|a| sizes.into_iter().map(move |s| (a, s)))
        {
            let tol = |want: &[f64]| {
                let big = want.iter().fold(1f64, |m, v| m.max(v.abs()));
                if algo.m == 2 {
                    1e-5
                } else {
                    1e-5 * big
                }
            };
            let x = rand(cin * h * w, 41);
            let k = rand(cout * cin * 9, 42);
            let t = Tiles::with(algo, h, w);
            let mut y = vec![f32::NAN; cout * h * w];
            Prepared::forward(&k, cout, cin, t).conv(&x, &mut y)?;
            let want = direct(&x, &k, cin, cout, h, w);
            let tl = tol(&want);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < tl,
                    "F({m}) {cin}->{cout} {h}x{w} at {i}: {a} vs {b}",
                    m = algo.m
                );
            }
            // The input gradient: the flipped kernel with its channels swapped.
            let g = rand(cout * h * w, 43);
            let mut flip = vec![0f32; cin * cout * 9];
            for co in 0..cout {
                for ci in 0..cin {
                    for a in 0..3 {
                        for b in 0..3 {
                            flip[((ci * cout + co) * 3 + a) * 3 + b] =
                                k[((co * cin + ci) * 3 + 2 - a) * 3 + 2 - b];
                        }
                    }
                }
            }
            let mut dx = vec![f32::NAN; cin * h * w];
            Prepared::input_grad(&k, cout, cin, t).conv(&g, &mut dx)?;
            let want = direct(&g, &flip, cout, cin, h, w);
            let tl = tol(&want);
            for (i, (a, b)) in dx.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < tl,
                    "F({m}) {cin}->{cout} {h}x{w} flipped at {i}: {a} vs {b}",
                    m = algo.m
                );
            }
        }
        Ok(())
    }
}
