//! AdamW with f32 state that can be saved and restored, learning-rate schedules, and
//! global-norm clipping. candle's own AdamW keeps its moments private, so a run
//! could not be checkpointed with it; this one follows `torch.optim.AdamW` step for step.

use crate::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// Named parameters with their first and second moments.
pub struct AdamW {
    pub cfg: AdamWConfig,
    params: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    pub step: u64,
}

impl AdamW {
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let m = params
            .iter()
            .map(|(_, p)| Tensor::zeros(p.shape(), DType::F32, p.device()))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let v = m.clone();
        Ok(Self {
            cfg,
            params,
            m,
            v,
            step: 0,
        })
    }

    pub fn params(&self) -> &[(String, Var)] {
        &self.params
    }

    /// One update with learning rate `lr`; parameters without a gradient are skipped,
    /// as torch skips params whose `.grad` is None.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let bc1 = 1.0 - c.beta1.powi(self.step as i32);
        let bc2_sqrt = (1.0 - c.beta2.powi(self.step as i32)).sqrt();
        for (i, (_, p)) in self.params.iter().enumerate() {
            let Some(g) = grads.get(p.as_tensor()) else {
                continue;
            };
            let g = g.to_dtype(DType::F32)?;
            let mut theta = p.as_tensor().to_dtype(DType::F32)?;
            if c.weight_decay != 0.0 {
                theta = (theta * (1.0 - lr * c.weight_decay))?;
            }
            let m = ((&self.m[i] * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
            let v = ((&self.v[i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
            let denom = ((v.sqrt()? / bc2_sqrt)? + c.eps)?;
            let update = (m.div(&denom)? * (lr / bc1))?;
            p.set(&(theta - update)?.to_dtype(p.dtype())?)?;
            self.m[i] = m;
            self.v[i] = v;
        }
        Ok(())
    }

    /// Writes the moments and the step counter (safetensors).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut t = BTreeMap::new();
        for (i, (name, _)) in self.params.iter().enumerate() {
            t.insert(format!("m.{name}"), self.m[i].clone());
            t.insert(format!("v.{name}"), self.v[i].clone());
        }
        t.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &candle_core::Device::Cpu)?,
        );
        crate::lora::write_safetensors(path, &t)
    }

    /// Restores what [`AdamW::save`] wrote; every parameter must be present.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let dev = self
            .params
            .first()
            .map(|(_, p)| p.device().clone())
            .unwrap_or(candle_core::Device::Cpu);
        let f = candle_core::safetensors::load(path, &dev)
            .map_err(|e| Error::Checkpoint(format!("{}: {e}", path.display())))?;
        for (i, (name, _)) in self.params.iter().enumerate() {
            let get = |k: String| {
                f.get(&k)
                    .cloned()
                    .ok_or_else(|| Error::Checkpoint(format!("{}: missing {k}", path.display())))
            };
            self.m[i] = get(format!("m.{name}"))?;
            self.v[i] = get(format!("v.{name}"))?;
        }
        let step = f
            .get("step")
            .ok_or_else(|| Error::Checkpoint(format!("{}: missing step", path.display())))?;
        self.step = step.to_vec1::<f64>()?[0] as u64;
        Ok(())
    }
}

/// Global L2 norm of the gradients of `params`, and (when `max_norm > 0`) the
/// gradients scaled by `max_norm / (norm + 1e-6)` when that is below 1, as torch's
/// `clip_grad_norm_` does.
pub fn clip_grad_norm(
    grads: GradStore,
    params: &[(String, Var)],
    max_norm: f64,
) -> Result<(GradStore, f64)> {
    let mut sq = 0f64;
    for (_, p) in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            sq += g
                .to_dtype(DType::F32)?
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = sq.sqrt();
    if max_norm <= 0.0 {
        return Ok((grads, norm));
    }
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if coef >= 1.0 {
        return Ok((grads, norm));
    }
    let mut out = GradStore::default();
    for (_, p) in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            out.insert(p.as_tensor(), (g * coef)?);
        }
    }
    Ok((out, norm))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    Constant,
    Linear,
    Cosine,
}

impl std::str::FromStr for Scheduler {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "constant" => Ok(Scheduler::Constant),
            "linear" => Ok(Scheduler::Linear),
            "cosine" => Ok(Scheduler::Cosine),
            o => Err(Error::Config(format!(
                "scheduler \"{o}\" (expected constant, linear or cosine)"
            ))),
        }
    }
}

/// The learning rate for 0-based optimizer step `step` of `total`, as transformers'
/// `get_{constant,linear,cosine}_schedule_with_warmup` give it.
pub fn lr_at(kind: Scheduler, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup.max(1) as f64;
    }
    let progress = (step - warmup) as f64 / (total.saturating_sub(warmup)).max(1) as f64;
    match kind {
        Scheduler::Constant => base,
        Scheduler::Linear => base * (1.0 - progress).max(0.0),
        Scheduler::Cosine => {
            base * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_transformers() {
        assert_eq!(lr_at(Scheduler::Constant, 1.0, 0, 0, 10), 1.0);
        assert_eq!(lr_at(Scheduler::Linear, 1.0, 0, 2, 10), 0.0);
        assert_eq!(lr_at(Scheduler::Linear, 1.0, 1, 2, 10), 0.5);
        assert_eq!(lr_at(Scheduler::Linear, 1.0, 2, 2, 10), 1.0);
        assert!((lr_at(Scheduler::Linear, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!((lr_at(Scheduler::Cosine, 1.0, 6, 2, 10) - 0.5).abs() < 1e-12);
        assert!(lr_at(Scheduler::Cosine, 1.0, 10, 2, 10).abs() < 1e-12);
    }
}
