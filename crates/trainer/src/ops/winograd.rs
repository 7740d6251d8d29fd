//! Winograd's F(2×2, 3×3) for the frozen 3×3, stride-1, padding-1 convolutions that make
//! up most of a Stable Diffusion UNet: each 2×2 block of outputs from a 4×4 block of
//! input in 16 products where direct convolution (im2col) takes 36, so the GEMMs do 4/9
//! of im2col's multiplications.
//!
//! Layouts are chosen so that every transform runs along contiguous rows: the input's
//! transform is `[in][16][tiles]` (one channel per task, the 16 products read it as
//! matrices with a row stride of `16·tiles`), the kernel's `[out][16][in]`, and the
//! products' results `[16][out][tiles]`, transformed back one output channel per task.
//! The input gradient is the same convolution of the output gradient with the kernel
//! flipped and its channels swapped; since flipping a 3×3 kernel reverses `G`'s rows 0
//! and 3 (`G·J = P·G`), the flipped kernel's transform is the forward one with planes
//! `(i, j)` read as `(p(i), p(j))`, and the products read it transposed in place.

use super::matmul;
use candle_core::{Layout, Result, Shape};
use rayon::prelude::*;

/// The transforms' sixteen planes, `(i, j)` as `4·i + j`, `i` along the height.
const PLANES: usize = 16;

/// Which plane of the forward kernel transform the flipped kernel's plane `(i, j)` is.
fn flipped(xi: usize) -> usize {
    let p = |i: usize| match i {
        0 => 3,
        3 => 0,
        i => i,
    };
    4 * p(xi / 4) + p(xi % 4)
}

/// The 2×2 tiles that cover an `h × w` plane.
#[derive(Clone, Copy)]
pub(super) struct Tiles {
    h: usize,
    w: usize,
    th: usize,
    tw: usize,
}

impl Tiles {
    pub(super) fn new(h: usize, w: usize) -> Self {
        Self {
            h,
            w,
            th: h.div_ceil(2),
            tw: w.div_ceil(2),
        }
    }
    fn count(&self) -> usize {
        self.th * self.tw
    }
}

/// `U = G·g·Gᵀ` for every `(out, in)` pair of a `(out, in, 3, 3)` kernel, laid out
/// `[out][16][in]`.
pub(super) fn kernel_transform(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    let mut u = vec![0f32; cout * PLANES * cin];
    u.par_chunks_mut(PLANES * cin)
        .zip(w.par_chunks(cin * 9))
        .for_each_init(
            || (vec![0f32; 9 * cin], vec![0f32; 3 * cin]),
            |(g, t), (out, kernel)| {
                // The nine taps as nine rows over the input channels, so that the
                // combinations below run along contiguous rows.
                for (ci, taps) in kernel.chunks_exact(9).enumerate() {
                    for (tap, &v) in taps.iter().enumerate() {
                        g[tap * cin + ci] = v;
                    }
                }
                // G's rows are (1, 0, 0), (½, ½, ½), (½, -½, ½), (0, 0, 1): row i of
                // G·g (three rows over the channels, one per kernel column), then the
                // same combinations along it for the planes (i, 0..4).
                for i in 0..4 {
                    for b in 0..3 {
                        let tap = |a: usize| &g[(3 * a + b) * cin..][..cin];
                        let dst = &mut t[b * cin..][..cin];
                        combine(dst, tap(0), tap(1), tap(2), i);
                    }
                    let (t0, t1, t2) = (&t[..cin], &t[cin..2 * cin], &t[2 * cin..]);
                    for j in 0..4 {
                        combine(&mut out[(4 * i + j) * cin..][..cin], t0, t1, t2, j);
                    }
                }
            },
        );
    u
}

/// Row `i` of `G` applied to three rows: `dst = Σ G[i][a]·r_a`.
fn combine(dst: &mut [f32], r0: &[f32], r1: &[f32], r2: &[f32], i: usize) {
    match i {
        0 => dst.copy_from_slice(r0),
        3 => dst.copy_from_slice(r2),
        _ => {
            let s = if i == 1 { 1.0 } else { -1.0 };
            for (((d, &a), &b), &c) in dst.iter_mut().zip(r0).zip(r1).zip(r2) {
                *d = 0.5 * (a + s * b + c);
            }
        }
    }
}

/// `Bᵀ·d·B` for every tile of `c` planes of `h × w` (padded by one zero on every side),
/// laid out `[c][16][tiles]`.
fn input_transform(x: &[f32], c: usize, t: Tiles) -> Vec<f32> {
    let (n, tw) = (t.count(), t.tw);
    let mut v = vec![0f32; c * PLANES * n];
    // Each padded input row's four horizontal combinations, `[row][4][tw]`, then the
    // vertical ones over each tile's four rows.
    let rows = 2 * t.th + 2;
    v.par_chunks_mut(PLANES * n)
        .zip(x.par_chunks(t.h * t.w))
        .for_each_init(
            || {
                (
                    vec![0f32; rows * 4 * tw],
                    vec![0f32; tw + 1],
                    vec![0f32; tw + 1],
                )
            },
            |(r, even, odd), (out, plane)| {
                for pr in 0..rows {
                    let dst = &mut r[pr * 4 * tw..][..4 * tw];
                    // Padded row `pr` is input row `pr - 1`.
                    if pr == 0 || pr > t.h {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[(pr - 1) * t.w..][..t.w];
                    // Tile column `tx` reads input columns 2tx-1 … 2tx+2: odd[tx], even[tx],
                    // odd[tx+1], even[tx+1], with odd[k] = x[2k-1] and even[k] = x[2k].
                    even.fill(0.0);
                    odd.fill(0.0);
                    for (k, pair) in src.chunks(2).enumerate() {
                        even[k] = pair[0];
                        if let Some(&v) = pair.get(1) {
                            odd[k + 1] = v;
                        }
                    }
                    let (d0, d1, d2, d3) = (&odd[..tw], &even[..tw], &odd[1..], &even[1..]);
                    let (h0, rest) = dst.split_at_mut(tw);
                    let (h1, rest) = rest.split_at_mut(tw);
                    let (h2, h3) = rest.split_at_mut(tw);
                    for (i, h) in [h0, h1, h2, h3].into_iter().enumerate() {
                        bt_row(h, [d0, d1, d2, d3], i);
                    }
                }
                for ty in 0..t.th {
                    let at = |row: usize, j: usize| &r[((2 * ty + row) * 4 + j) * tw..][..tw];
                    for j in 0..4 {
                        let (a0, a1, a2, a3) = (at(0, j), at(1, j), at(2, j), at(3, j));
                        for i in 0..4 {
                            let dst = &mut out[(4 * i + j) * n + ty * tw..][..tw];
                            bt_row(dst, [a0, a1, a2, a3], i);
                        }
                    }
                }
            },
        );
    v
}

/// Row `i` of `Bᵀ` ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1)) applied to
/// four rows.
fn bt_row(dst: &mut [f32], d: [&[f32]; 4], i: usize) {
    let (p, q, sign) = match i {
        0 => (d[0], d[2], -1.0),
        1 => (d[1], d[2], 1.0),
        2 => (d[2], d[1], -1.0),
        _ => (d[1], d[3], -1.0),
    };
    for ((o, &p), &q) in dst.iter_mut().zip(p).zip(q) {
        *o = p + sign * q;
    }
}

/// `Aᵀ·m·A` for every tile of `[16][c][tiles]` products, into `c` planes of `h × w`.
fn output_transform(m: &[f32], c: usize, t: Tiles, y: &mut [f32]) {
    let (n, tw) = (t.count(), t.tw);
    y.par_chunks_mut(t.h * t.w).enumerate().for_each_init(
        || (vec![0f32; 8 * tw], vec![0f32; 2 * tw], vec![0f32; 2 * tw]),
        |(s, top, bottom), (co, plane)| {
            for ty in 0..t.th {
                let at = |xi: usize| &m[(xi * c + co) * n + ty * tw..][..tw];
                // Down the tile's rows: (1, 1, 1, 0) and (0, 1, -1, -1).
                for j in 0..4 {
                    let (m0, m1, m2, m3) = (at(j), at(4 + j), at(8 + j), at(12 + j));
                    let (s0, s1) = s[2 * j * tw..][..2 * tw].split_at_mut(tw);
                    for (((s, &a), &b), &c) in s0.iter_mut().zip(m0).zip(m1).zip(m2) {
                        *s = a + b + c;
                    }
                    for (((s, &a), &b), &c) in s1.iter_mut().zip(m1).zip(m2).zip(m3) {
                        *s = a - b - c;
                    }
                }
                // Along them, interleaving each tile's two columns.
                for (i, dst) in [&mut *top, &mut *bottom].into_iter().enumerate() {
                    let row = |j: usize| &s[(2 * j + i) * tw..][..tw];
                    let (a0, a1, a2, a3) = (row(0), row(1), row(2), row(3));
                    for (k, pair) in dst.chunks_exact_mut(2).enumerate() {
                        pair[0] = a0[k] + a1[k] + a2[k];
                        pair[1] = a1[k] - a2[k] - a3[k];
                    }
                }
                for (i, src) in [&*top, &*bottom].into_iter().enumerate() {
                    let oy = 2 * ty + i;
                    if oy < t.h {
                        plane[oy * t.w..][..t.w].copy_from_slice(&src[..t.w]);
                    }
                }
            }
        },
    );
}

/// One image's 3×3, stride-1, padding-1 convolution of `cin` planes of `h × w` by the
/// kernel transform `u` (`[out][16][in]` from [`kernel_transform`]) into `cout` planes
/// of the same size. With `flip`, the products take `u` as the flipped kernel with its
/// channels swapped (`cin` is then the kernel's output count): the input gradient.
pub(super) fn conv(
    x: &[f32],
    u: &[f32],
    cin: usize,
    cout: usize,
    t: Tiles,
    flip: bool,
    y: &mut [f32],
) -> Result<()> {
    let n = t.count();
    let v = input_transform(x, cin, t);
    let mut m = vec![0f32; PLANES * cout * n];
    // Sixteen independent products, each on one thread: splitting each again would only
    // add a wait per product.
    m.par_chunks_mut(cout * n)
        .enumerate()
        .try_for_each(|(xi, mxi)| -> Result<()> {
            // The input's plane `xi`: `(cin, tiles)` rows `16·tiles` apart.
            let lv = Layout::new(Shape::from((cin, n)), vec![PLANES * n, 1], xi * n);
            let lu = if flip {
                // `u` is `[cin][16][cout]` here; plane `flipped(xi)` read transposed.
                Layout::new(
                    Shape::from((cout, cin)),
                    vec![1, PLANES * cout],
                    flipped(xi) * cout,
                )
            } else {
                Layout::new(Shape::from((cout, cin)), vec![PLANES * cin, 1], xi * cin)
            };
            matmul::matmul_into_on(1, mxi, false, u, &lu, &v, &lv, (cout, n, cin))
        })?;
    output_transform(&m, cout, t, y);
    Ok(())
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
        for (cin, cout, h, w) in [
            (3, 5, 6, 6),
            (4, 2, 5, 7),
            (1, 1, 1, 1),
            (7, 3, 9, 4),
            (2, 6, 2, 3),
        ] {
            let x = rand(cin * h * w, 41);
            let k = rand(cout * cin * 9, 42);
            let t = Tiles::new(h, w);
            let u = kernel_transform(&k, cout, cin);
            let mut y = vec![f32::NAN; cout * h * w];
            conv(&x, &u, cin, cout, t, false, &mut y)?;
            let want = direct(&x, &k, cin, cout, h, w);
            for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{cin}->{cout} {h}x{w} at {i}: {a} vs {b}"
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
            conv(&g, &u, cout, cin, t, true, &mut dx)?;
            let want = direct(&g, &flip, cout, cin, h, w);
            for (i, (a, b)) in dx.iter().zip(&want).enumerate() {
                assert!(
                    (*a as f64 - b).abs() < 1e-5,
                    "{cin}->{cout} {h}x{w} flipped at {i}: {a} vs {b}"
                );
            }
        }
        Ok(())
    }
}
