//! Helpers the trainer's fidelity tests share: where the fixtures are, and how far a
//! tensor is from its reference.

#![allow(dead_code)] // each test binary uses its own subset

use candle_core::{DType, Tensor};
use std::path::PathBuf;

/// `tests/fixtures` at the repository root.
pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// max |a - b|, computed in f64.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let f = |t: &Tensor| t.to_dtype(DType::F64).unwrap();
    (f(a) - f(b))
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap()
}

/// max |ours - reference| / max |reference|.
pub fn rel(ours: &Tensor, reference: &Tensor) -> f64 {
    let s = reference
        .to_dtype(DType::F64)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    max_abs_diff(ours, reference) / s.max(1e-12)
}
