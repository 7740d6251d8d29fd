#!/usr/bin/env python3
"""The coefficients of loraforge's vectorised erf (crates/trainer/src/ops/vmath.rs), and their error.

erf(x) for |x| < 1 is x + x·P(x²); from 1 on, 1 − e^(−x²)·Q(t) with t = 1/(1 + |x|/2) and |x|
clamped at 4 (where erf rounds to 1 in f32). P (degree 6) and Q (degree 7) are least-squares fits,
weighted by the inverse of the value, at 4,000 Chebyshev points, against mpmath's erf at 30 digits;
P's constant term has 1 taken out, so that x itself is the exact leading term. The script prints the
coefficients rounded to f32 and the worst error, in ulp, of the formula evaluated in f32 arithmetic
as the Rust code does (Horner, no fused multiply-add) over |x| < 4.5.

    python3 scripts/fit_erf.py      # needs numpy and mpmath (the bench venv has both)
"""
import mpmath
import numpy as np

mpmath.mp.dps = 30
f32 = np.float32


def fit(xs, ys, ts, deg):
    v = np.vander(ts, deg + 1, increasing=True)
    w = 1 / ys
    c, *_ = np.linalg.lstsq(v * w[:, None], ys * w, rcond=None)
    return c


def cheb(lo, hi, n=4000):
    return lo + (hi - lo) * (1 - np.cos(np.linspace(0, np.pi, n))) / 2


def horner(c, t):
    p = f32(c[-1])
    for a in c[-2::-1]:
        p = f32(f32(p * t) + f32(a))
    return p


def main():
    u = cheb(0.0, 1.0)
    x = np.sqrt(u)
    y = np.array([float(mpmath.erf(v) / v) if v > 0 else float(2 / mpmath.sqrt(mpmath.pi)) for v in x])
    p = fit(x, y, u, 6)
    p[0] -= 1.0
    x = cheb(1.0, 4.0)
    y = np.array([float(mpmath.erfc(v) * mpmath.exp(v * v)) for v in x])
    q = fit(x, y, 1 / (1 + x / 2), 7)
    p32, q32 = [f32(v) for v in p], [f32(v) for v in q]
    print("P", [np.format_float_positional(v, unique=True) for v in p32])
    print("Q", [np.format_float_positional(v, unique=True) for v in q32])

    def erf32(v):
        a = f32(abs(v))
        small = f32(a + f32(a * horner(p32, f32(a * a))))
        c = min(a, f32(4.0))
        t = f32(f32(1) / f32(f32(1) + f32(c * f32(0.5))))
        large = f32(f32(1) - f32(np.exp(f32(-f32(c * c))) * horner(q32, t)))
        return small if a < 1 else large

    worst, at = 0.0, 0.0
    for v in np.linspace(0, 4.5, 60001).astype(f32)[1:]:
        want = float(mpmath.erf(float(v)))
        e = abs(float(erf32(v)) - want) / float(np.spacing(f32(want)))
        if e > worst:
            worst, at = e, float(v)
    print(f"worst {worst:.2f} ulp at {at} (numpy's f32 exp standing in for vmath::exp)")


if __name__ == "__main__":
    main()
