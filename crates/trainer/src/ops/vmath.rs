//! Exponentials, maxima and sums over rows, many elements at a time.
//!
//! The row loops call `exp` about a hundred million times a step on SmolLM2 (the head
//! loss's softmax over 49,152 words a token, SiLU forward and back, the attention's
//! probabilities). glibc's `expf` is one call per element, and a sum written as a fold is
//! one addition after another: the compiler may reorder neither. Here `exp` is plain
//! arithmetic the compiler can widen (Cody–Waite reduction and Cephes' polynomial,
//! within 2 ulp of the true value), and sums and maxima keep 16 partial
//! results. Each loop is compiled for AVX-512, for AVX2 and for the baseline, and the
//! widest the CPU has runs, chosen at run time. There is no fused multiply-add in the
//! arithmetic (Rust never contracts `a * b + c`), so every path computes the same bits.

/// Partial results a sum or maximum keeps: one AVX-512 register of f32.
const LANES: usize = 16;

/// `e^x`, within 2 ulp of the true value for normal results; `x` below about −104 gives
/// +0 and above about 88.72 gives +∞, as `f32::exp`; NaN stays NaN. Inlined into the
/// loops below so that they vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // ln 2 in two parts: `n · LN2_HI` is exact for the |n| ≤ 151 used here.
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // 1.5 · 2^23: adding it rounds to an integer, which then sits in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Clamped so that n stays within ±151 (2^n then splits into two normal halves); the
    // clamp's ends give 0 and ∞ through the arithmetic itself. NaN passes through.
    let x = x.clamp(-104.5, 89.0);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_2e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let y = p * r * r + r + 1.0;
    // 2^n as two factors 2^h · 2^(n−h), each a normal number, so results near the top
    // do not overflow early and those near the bottom round once, into subnormals.
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let h = ni >> 1;
    let pow2 = |e: i32| f32::from_bits((e.wrapping_add(127) as u32).wrapping_shl(23));
    y * pow2(h) * pow2(ni.wrapping_sub(h))
}

/// `erf(x)`, within 1.5 ulp of the true value (libm's `erff` is one call per element with
/// branches; this is arithmetic the loops below widen). Below |x| = 1, `x + x·P(x²)`; from
/// there, `1 − e^(−x²)·Q(t)` with `t = 1/(1 + |x|/2)` and |x| clamped at 4, where erf
/// rounds to 1. P and Q are least-squares fits (`scripts/fit_erf.py`), evaluated in f32.
#[inline(always)]
pub(crate) fn erf(x: f32) -> f32 {
    const P: [f32; 7] = [
        0.128_379_17,
        -0.376_126_26,
        0.112_835_824,
        -0.026_853_692,
        0.005_188_099_6,
        -0.000_800_819_3,
        0.000_078_472_62,
    ];
    const Q: [f32; 8] = [
        -0.000_154_543_09,
        0.284_917,
        0.259_666_74,
        0.347_843_53,
        -0.103_617_57,
        0.563_166_7,
        -0.471_049_7,
        0.119_280_584,
    ];
    let a = x.abs();
    let u = a * a;
    let mut p = P[6];
    for &c in P[..6].iter().rev() {
        p = p * u + c;
    }
    let small = a + a * p;
    // NaN passes the clamp (and the comparison below) as NaN.
    let c = if a > 4.0 { 4.0 } else { a };
    let t = 1.0 / (1.0 + c * 0.5);
    let mut q = Q[7];
    for &k in Q[..7].iter().rev() {
        q = q * t + k;
    }
    let large = 1.0 - exp(-(c * c)) * q;
    let r = if a < 1.0 { small } else { large };
    r.copysign(x)
}

/// Defines `fn $name(args) -> ret` whose body is compiled three times, for AVX-512, for
/// AVX2 and for the baseline, the widest the CPU has being picked at each call (the
/// check is one load of a flag std caches). The body and everything it calls must be
/// `#[inline(always)]`, so that it is compiled inside each variant and widened there.
macro_rules! multiversion {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$m])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn imp($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx2,avx")]
                unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                #[target_feature(enable = "avx2,avx")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    imp($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx512f") {
                    // SAFETY: the CPU has the features the variant is compiled for.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2") {
                    // SAFETY: as above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            imp($($arg),*)
        }
    };
}

#[inline(always)]
fn fold_lanes(acc: [f32; LANES], f: impl Fn(f32, f32) -> f32) -> f32 {
    // Pairwise, as a vector reduction would.
    let mut a = acc;
    let mut w = LANES;
    while w > 1 {
        w /= 2;
        for i in 0..w {
            a[i] = f(a[i], a[i + w]);
        }
    }
    a[0]
}

multiversion! {
    /// The largest element (−∞ for none; NaNs are passed over).
    pub(crate) fn max(x: &[f32]) -> f32 {
        let mut acc = [f32::NEG_INFINITY; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
            }
        }
        let m = fold_lanes(acc, |a, b| if b > a { b } else { a });
        tail.iter().fold(m, |m, &v| if v > m { v } else { m })
    }
}

multiversion! {
    /// `x[i] = e^(x[i] − shift)` for every element; returns their sum.
    pub(crate) fn exp_shifted_in_place(x: &mut [f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let mut chunks = x.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let e = exp(c[i] - shift);
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut s = fold_lanes(acc, |a, b| a + b);
        for v in chunks.into_remainder() {
            *v = exp(*v - shift);
            s += *v;
        }
        s
    }
}

multiversion! {
    /// `Σ e^(x[i] − shift)`, leaving `x` as it is.
    pub(crate) fn exp_shifted_sum(x: &[f32], shift: f32) -> f32 {
        let mut acc = [0f32; LANES];
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for c in chunks {
            for i in 0..LANES {
                acc[i] += exp(c[i] - shift);
            }
        }
        let s = fold_lanes(acc, |a, b| a + b);
        tail.iter().fold(s, |s, &v| s + exp(v - shift))
    }
}

multiversion! {
    /// `x[i] *= s`.
    pub(crate) fn scale(x: &mut [f32], s: f32) {
        x.iter_mut().for_each(|v| *v *= s);
    }
}

multiversion! {
    /// The softmax's backward for one row, in place: `d = s · p ⊙ (d − Σ d⊙p)`, `d` the
    /// probabilities' gradient on entry. The sum in 16 partial sums: one running sum is a
    /// chain of dependent adds, four cycles an element (6% of an SD attention backward).
    pub(crate) fn softmax_grad_row(d: &mut [f32], p: &[f32], s: f32) {
        let mut acc = [0f32; LANES];
        let (dc, pc) = (d.chunks_exact(LANES), p.chunks_exact(LANES));
        let (dt, pt) = (dc.remainder(), pc.remainder());
        for (dv, pv) in dc.zip(pc) {
            for i in 0..LANES {
                acc[i] += pv[i] * dv[i];
            }
        }
        let dot = dt
            .iter()
            .zip(pt)
            .fold(fold_lanes(acc, |a, b| a + b), |a, (dv, pv)| a + pv * dv);
        for (dv, &pv) in d.iter_mut().zip(p) {
            *dv = s * pv * (*dv - dot);
        }
    }
}

/// The max-subtracted softmax of a row, in place: `(max, Σ e^(x − max))` returned.
pub(crate) fn softmax_in_place(row: &mut [f32]) -> (f32, f32) {
    let max = max(row);
    let sum = exp_shifted_in_place(row, max);
    scale(row, 1.0 / sum);
    (max, sum)
}

/// `(max, ln Σ e^(x − max))` of a row.
pub(crate) fn log_sum_exp(x: &[f32]) -> (f32, f32) {
    let max = max(x);
    (max, exp_shifted_sum(x, max).ln())
}

/// candle's SiLU, `x / (1 + e^−x)`.
#[inline(always)]
fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

multiversion! {
    /// SwiGLU: `out = silu(gate) · up`.
    pub(crate) fn silu_mul(out: &mut [f32], gate: &[f32], up: &[f32]) {
        for ((o, &g), &u) in out.iter_mut().zip(gate).zip(up) {
            *o = silu(g) * u;
        }
    }
}

multiversion! {
    /// SwiGLU's backward for its output gradient `d`: `dgate = d·up·σ(x)·(1 + x·(1 − σ(x)))`
    /// and `dup = d·silu(x)`, with one exponential per element for both.
    pub(crate) fn silu_mul_bwd(dgate: &mut [f32], dup: &mut [f32], x: &[f32], up: &[f32], d: &[f32]) {
        let n = dgate.len().min(dup.len()).min(x.len()).min(up.len()).min(d.len());
        for i in 0..n {
            let (xv, uv, dv) = (x[i], up[i], d[i]);
            let e = exp(-xv);
            let s = 1.0 / (1.0 + e);
            dgate[i] = dv * uv * s * (1.0 + xv * (1.0 - s));
            // silu(x), as the forward computes it.
            dup[i] = dv * (xv / (1.0 + e));
        }
    }
}

multiversion! {
    /// The exact GELU, `x·Φ(x)` as candle writes it: `(erf(x/√2) + 1) · 0.5 · x`.
    pub(crate) fn gelu_erf(out: &mut [f32], x: &[f32]) {
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (erf(v * std::f32::consts::FRAC_1_SQRT_2) + 1.0) * 0.5 * v;
        }
    }
}

multiversion! {
    /// The exact GELU's backward: `g · (Φ(x) + x·φ(x))`, `φ(x) = e^(−x²/2)/√(2π)`.
    pub(crate) fn gelu_erf_bwd(out: &mut [f32], x: &[f32], g: &[f32]) {
        const INV_SQRT_2PI: f32 = 0.398_942_3;
        for ((o, &v), &gv) in out.iter_mut().zip(x).zip(g) {
            let cdf = 0.5 + 0.5 * erf(v * std::f32::consts::FRAC_1_SQRT_2);
            let pdf = INV_SQRT_2PI * exp(-0.5 * v * v);
            *o = gv * (cdf + v * pdf);
        }
    }
}

multiversion! {
    /// `(Σ x, Σ (x − c)²)` for a shift `c` (the second sum is what a variance needs once the
    /// mean is known; `c = 0` makes it a sum of squares).
    pub(crate) fn sum_and_sq_dev(x: &[f32], c: f32) -> (f32, f32) {
        let (mut s, mut q) = ([0f32; LANES], [0f32; LANES]);
        let chunks = x.chunks_exact(LANES);
        let tail = chunks.remainder();
        for ch in chunks {
            for i in 0..LANES {
                s[i] += ch[i];
                q[i] += (ch[i] - c) * (ch[i] - c);
            }
        }
        let (s, q) = (fold_lanes(s, |a, b| a + b), fold_lanes(q, |a, b| a + b));
        tail.iter()
            .fold((s, q), |(s, q), &v| (s + v, q + (v - c) * (v - c)))
    }
}

multiversion! {
    /// One LayerNorm row with per-feature frozen `w` and `b`: `out = (x − mean)/s · w + b`.
    pub(crate) fn layer_norm_row(out: &mut [f32], x: &[f32], w: &[f32], b: &[f32], mean: f32, s: f32) {
        for (((o, &v), &wv), &bv) in out.iter_mut().zip(x).zip(w).zip(b) {
            *o = (v - mean) / s * wv + bv;
        }
    }
}

multiversion! {
    /// A LayerNorm row's backward, `out = dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂)) / s` with
    /// `ĝ = g · w` and `x̂ = (x − mean)/s`; the two means over lanes, then pairwise.
    pub(crate) fn layer_norm_row_bwd(out: &mut [f32], x: &[f32], g: &[f32], w: &[f32], mean: f32, s: f32) {
        let n = out.len().min(x.len()).min(g.len()).min(w.len());
        let (out, x, g, w) = (&mut out[..n], &x[..n], &g[..n], &w[..n]);
        let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
        let full = n / LANES * LANES;
        for c in (0..full).step_by(LANES) {
            for i in 0..LANES {
                let gh = g[c + i] * w[c + i];
                sg[i] += gh;
                sgx[i] += gh * ((x[c + i] - mean) / s);
            }
        }
        let (mut a, mut bsum) = (fold_lanes(sg, |p, q| p + q), fold_lanes(sgx, |p, q| p + q));
        for i in full..n {
            let gh = g[i] * w[i];
            a += gh;
            bsum += gh * ((x[i] - mean) / s);
        }
        let (mg, mgx) = (a / n as f32, bsum / n as f32);
        for (((o, &v), &gv), &wv) in out.iter_mut().zip(x).zip(g).zip(w) {
            *o = (gv * wv - mg - (v - mean) / s * mgx) / s;
        }
    }
}

/// One channel of a norm: its group's mean and `s = √(var + eps)`, and the channel's
/// frozen scale `w` and shift `b`.
#[derive(Clone, Copy)]
pub(crate) struct ChannelNorm {
    pub mean: f32,
    pub s: f32,
    pub w: f32,
    pub b: f32,
}

multiversion! {
    /// One channel of a GroupNorm: `a = (x − mean)/s · w + b`, then `silu(a)` when `silu`.
    pub(crate) fn norm_affine(out: &mut [f32], x: &[f32], cn: ChannelNorm, silu_after: bool) {
        let ChannelNorm { mean, s, w, b } = cn;
        if silu_after {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = silu((v - mean) / s * w + b);
            }
        } else {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = (v - mean) / s * w + b;
            }
        }
    }
}

multiversion! {
    /// The first half of a GroupNorm channel's backward: `out = ĝ = g' · w`, with `g'` the
    /// output gradient `g` taken back through the SiLU when `silu_after`; returns
    /// `(Σ ĝ, Σ ĝ · x̂)` for the group's means.
    pub(crate) fn norm_affine_bwd(out: &mut [f32], x: &[f32], g: &[f32], cn: ChannelNorm, silu_after: bool) -> (f32, f32) {
        let ChannelNorm { mean, s, w, b } = cn;
        let (mut sg, mut sgx) = ([0f32; LANES], [0f32; LANES]);
        let n = out.len().min(x.len()).min(g.len());
        let (out, x, g) = (&mut out[..n], &x[..n], &g[..n]);
        let one = |xv: f32, gv: f32| -> (f32, f32) {
            let xh = (xv - mean) / s;
            let d = if silu_after {
                let a = xh * w + b;
                let sig = 1.0 / (1.0 + exp(-a));
                gv * sig * (1.0 + a * (1.0 - sig))
            } else {
                gv
            };
            (d * w, xh)
        };
        let full = n / LANES * LANES;
        for c in (0..full).step_by(LANES) {
            for i in 0..LANES {
                let (gh, xh) = one(x[c + i], g[c + i]);
                out[c + i] = gh;
                sg[i] += gh;
                sgx[i] += gh * xh;
            }
        }
        let (mut a, mut bsum) = (fold_lanes(sg, |p, q| p + q), fold_lanes(sgx, |p, q| p + q));
        for i in full..n {
            let (gh, xh) = one(x[i], g[i]);
            out[i] = gh;
            a += gh;
            bsum += gh * xh;
        }
        (a, bsum)
    }
}

multiversion! {
    /// The second half: `dx = (ĝ − mean(ĝ) − x̂ · mean(ĝ·x̂)) / s`, over `out = ĝ`.
    pub(crate) fn norm_bwd_finish(out: &mut [f32], x: &[f32], cn: ChannelNorm, mg: f32, mgx: f32) {
        let ChannelNorm { mean, s, .. } = cn;
        for (o, &v) in out.iter_mut().zip(x) {
            *o = (*o - mg - (v - mean) / s * mgx) / s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        let ulp = (f32::from_bits(b32.to_bits() + 1) - b32) as f64;
        (a as f64 - b).abs() / ulp
    }

    #[test]
    fn exp_is_within_two_ulp_of_the_true_value_and_keeps_the_edges() {
        let mut worst = 0f64;
        let mut x = -87.3f32;
        while x < 88.7 {
            let got = exp(x);
            worst = worst.max(ulps(got, (x as f64).exp()));
            x += 0.000_731;
        }
        assert!(worst <= 2.0, "{worst} ulp");
        // Subnormal results: within one of the smallest steps of the true value.
        for x in [-88.0f32, -95.5, -100.0, -103.9] {
            let want = (x as f64).exp();
            let step = f32::from_bits(1) as f64;
            assert!(
                (exp(x) as f64 - want).abs() <= step,
                "{x}: {} {want}",
                exp(x)
            );
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-105.0), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-1e30), 0.0);
        assert!(exp(88.7) < f32::INFINITY && exp(88.7) > 3.2e38);
        assert_eq!(exp(88.73), f32::INFINITY);
        assert_eq!(exp(1e30), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
    }

    #[test]
    fn row_helpers_agree_with_plain_loops() {
        // Lengths around the lane width, so tails and the folds are crossed.
        for n in [1usize, 15, 16, 17, 33, 1000] {
            let x: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.37)
                .collect();
            let m = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!(max(&x), m);
            let want: f64 = x.iter().map(|&v| ((v - m) as f64).exp()).sum();
            let got = exp_shifted_sum(&x, m) as f64;
            assert!((got - want).abs() / want < 1e-6, "{n}: {got} {want}");
            let mut y = x.clone();
            let (m2, s) = softmax_in_place(&mut y);
            assert_eq!(m2, m);
            assert!((s as f64 - want).abs() / want < 1e-6);
            for (p, &v) in y.iter().zip(&x) {
                let w = ((v - m) as f64).exp() / want;
                assert!(
                    (*p as f64 - w).abs() <= 1e-6 * w.max(1e-30) + 1e-12,
                    "{p} {w}"
                );
            }
            let (m3, lse) = log_sum_exp(&x);
            assert_eq!(m3, m);
            assert!((lse as f64 - want.ln()).abs() < 1e-6);
            // The softmax backward over those probabilities, against f64.
            let dp: Vec<f32> = (0..n)
                .map(|i| ((i * 53 % 29) as f32 - 14.0) * 0.1)
                .collect();
            let dot: f64 = y.iter().zip(&dp).map(|(&p, &d)| p as f64 * d as f64).sum();
            let mut ds = dp.clone();
            softmax_grad_row(&mut ds, &y, 0.7);
            for ((&g, &p), &d) in ds.iter().zip(&y).zip(&dp) {
                let w = 0.7 * p as f64 * (d as f64 - dot);
                assert!(
                    (g as f64 - w).abs() <= 1e-6 * (p as f64) + 1e-12,
                    "{n}: {g} {w}"
                );
            }
        }
        assert_eq!(max(&[]), f32::NEG_INFINITY);
        assert_eq!(max(&[f32::NAN, 1.0]), 1.0);
    }

    #[test]
    fn erf_is_within_one_and_a_half_ulp_and_gelu_follows() {
        use candle_core::cpu::erf::erf_f64;
        let mut worst = (0f64, 0f32);
        let mut x = -5.0f32;
        while x < 5.0 {
            let e = ulps(erf(x), erf_f64(x as f64));
            if e > worst.0 {
                worst = (e, x);
            }
            x += 0.000_377;
        }
        for x in [1e-38f32, 1e-20, 1e-8, 3e-4, 0.999_999, 1.0, 3.92, 4.0] {
            let e = ulps(erf(x), erf_f64(x as f64));
            if e > worst.0 {
                worst = (e, x);
            }
        }
        assert!(worst.0 <= 1.5, "{} ulp at {}", worst.0, worst.1);
        assert_eq!(erf(0.0), 0.0);
        assert!(erf(-0.0).is_sign_negative());
        assert_eq!(erf(f32::INFINITY), 1.0);
        assert_eq!(erf(f32::NEG_INFINITY), -1.0);
        assert_eq!(erf(1e30), 1.0);
        assert!(erf(f32::NAN).is_nan());
        // GELU and its derivative against f64.
        let x: Vec<f32> = (0..2001).map(|i| (i as f32 - 1000.0) * 0.006).collect();
        let g: Vec<f32> = x.iter().map(|v| 1.0 - v * 0.05).collect();
        let (mut y, mut dy) = (vec![0f32; x.len()], vec![0f32; x.len()]);
        gelu_erf(&mut y, &x);
        gelu_erf_bwd(&mut dy, &x, &g);
        for i in 0..x.len() {
            let (v, gv) = (x[i] as f64, g[i] as f64);
            let cdf = 0.5 * (1.0 + erf_f64(v / std::f64::consts::SQRT_2));
            let pdf = (-0.5 * v * v).exp() / (2.0 * std::f64::consts::PI).sqrt();
            // f32's 1 + erf near erf = −1 keeps about 1e-7 absolute of Φ.
            assert!(
                (y[i] as f64 - v * cdf).abs() <= 2e-7 * v.abs().max(1.0),
                "gelu at {v}"
            );
            let want = gv * (cdf + v * pdf);
            assert!(
                (dy[i] as f64 - want).abs() <= 3e-7 * gv.abs().max(1.0),
                "gelu' at {v}"
            );
        }
    }

    #[test]
    fn silu_agrees_with_f64() {
        let x: Vec<f32> = (0..1001).map(|i| (i as f32 - 500.0) * 0.023).collect();
        let up: Vec<f32> = x.iter().map(|v| 0.5 - v * 0.3).collect();
        let d: Vec<f32> = x.iter().map(|v| 1.0 + v * 0.1).collect();
        let n = x.len();
        let (mut y, mut dg, mut du) = (vec![0f32; n], vec![0f32; n], vec![0f32; n]);
        silu_mul(&mut y, &x, &up);
        silu_mul_bwd(&mut dg, &mut du, &x, &up, &d);
        let close = |a: f32, b: f64| (a as f64 - b).abs() <= 1e-6 * b.abs().max(1e-3);
        for i in 0..n {
            let (xv, uv, dv) = (x[i] as f64, up[i] as f64, d[i] as f64);
            let s = 1.0 / (1.0 + (-xv).exp());
            assert!(
                close(y[i], xv * s * uv),
                "silu·up at {xv}: {} {}",
                y[i],
                xv * s * uv
            );
            let want_dg = dv * uv * s * (1.0 + xv * (1.0 - s));
            // Its factor 1 + x·(1 − σ) cancels near x = −1.28: an error of the size of
            // its other factors' product, not of the result.
            let tol = 1e-6 * (dv * uv).abs().max(want_dg.abs());
            assert!(
                (dg[i] as f64 - want_dg).abs() <= tol,
                "dgate at {xv}: {} {want_dg}",
                dg[i]
            );
            assert!(close(du[i], dv * xv * s), "dup at {xv}");
        }
    }
}
