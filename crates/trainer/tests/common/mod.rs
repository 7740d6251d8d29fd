//! Helpers the trainer's fidelity tests share: where the fixtures are, and how far a
//! tensor is from its reference.

#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// `tests/fixtures` at the repository root, or `LORAFORGE_FIXTURES`: a test binary built on
/// one machine and run from another checkout (scripts/gpu-check.sh on a lent GPU).
pub fn fixtures() -> PathBuf {
    std::env::var_os("LORAFORGE_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures"))
}

/// max |t|, computed in f64.
pub fn max_abs(t: &Tensor) -> f64 {
    t.to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |a - b|, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    max_abs(&(f(a) - f(b)).unwrap())
}

/// max |ours - reference| / max |reference|.
pub fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    max_abs_diff(ours, reference) / max_abs(reference).max(1e-12)
}
