//! The DDPM training step as diffusers' `train_text_to_image_lora.py` takes it: the
//! noise schedule from `scheduler/scheduler_config.json`, per-sample timesteps and
//! noising, the epsilon / v-prediction / sample targets, and min-SNR loss weights.

use crate::{Error, Result};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;
use std::path::Path;

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    Epsilon,
    VPrediction,
    Sample,
}

impl Prediction {
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Prediction::Epsilon),
            "v_prediction" => Ok(Prediction::VPrediction),
            "sample" => Ok(Prediction::Sample),
            _ => Err(Error::Config(format!(
                "prediction_type \"{s}\": expected epsilon, v_prediction or sample"
            ))),
        }
    }
}

/// The forward-process schedule: ᾱ_t for every training timestep.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub alphas_cumprod: Vec<f32>,
    pub prediction: Prediction,
}

impl Schedule {
    /// Reads a diffusers `scheduler/` folder (DDPM, DDIM, PNDM, Euler… configs share
    /// these fields).
    pub fn load(dir: &Path) -> Result<Self> {
        let p = dir.join("scheduler_config.json");
        Self::from_json(&crate::io::read_json(&p)?)
    }

    pub fn from_json(v: &Value) -> Result<Self> {
        let n = v
            .get("num_train_timesteps")
            .and_then(Value::as_u64)
            .unwrap_or(1000) as usize;
        if n == 0 {
            return Err(Error::Config("scheduler: num_train_timesteps is 0".into()));
        }
        if v.get("trained_betas").is_some_and(|b| !b.is_null()) {
            return Err(Error::Unsupported("scheduler: trained_betas".into()));
        }
        if v.get("rescale_betas_zero_snr").and_then(Value::as_bool) == Some(true) {
            return Err(Error::Unsupported(
                "scheduler: rescale_betas_zero_snr".into(),
            ));
        }
        let f = |k: &str, d: f64| v.get(k).and_then(Value::as_f64).unwrap_or(d);
        let (start, end) = (f("beta_start", 0.0001), f("beta_end", 0.02));
        let kind = v
            .get("beta_schedule")
            .and_then(Value::as_str)
            .unwrap_or("linear");
        // In f32, as diffusers computes them, so ᾱ matches its to the last bit or two.
        let lin = |a: f32, b: f32| -> Vec<f32> {
            (0..n)
                .map(|i| {
                    if n == 1 {
                        a
                    } else {
                        a + (b - a) * i as f32 / (n - 1) as f32
                    }
                })
                .collect()
        };
        let betas: Vec<f32> = match kind {
            "linear" => lin(start as f32, end as f32),
            "scaled_linear" => lin((start as f32).sqrt(), (end as f32).sqrt())
                .into_iter()
                .map(|b| b * b)
                .collect(),
            "squaredcos_cap_v2" => {
                let ab = |t: f64| {
                    ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                        .cos()
                        .powi(2)
                };
                (0..n)
                    .map(|i| {
                        let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                        (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                    })
                    .collect()
            }
            other => {
                return Err(Error::Unsupported(format!(
                    "scheduler: beta_schedule {other}"
                )))
            }
        };
        let mut acc = 1f32;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= 1.0 - b;
                acc
            })
            .collect();
        let prediction = Prediction::parse(
            v.get("prediction_type")
                .and_then(Value::as_str)
                .unwrap_or("epsilon"),
        )?;
        Ok(Schedule {
            alphas_cumprod,
            prediction,
        })
    }

    pub fn timesteps(&self) -> usize {
        self.alphas_cumprod.len()
    }

    /// One timestep per sample, uniform over the schedule (`torch.randint(0, T, (b,))`).
    pub fn draw_timesteps(&self, b: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
        (0..b)
            .map(|_| rng.random_range(0..self.timesteps()))
            .collect()
    }

    /// `(sqrt(ᾱ_t), sqrt(1 - ᾱ_t))`, the weights of the clean latent and of the noise.
    pub fn coefficients(&self, t: usize) -> (f32, f32) {
        let a = self.alphas_cumprod[t];
        (a.sqrt(), (1.0 - a).sqrt())
    }

    /// `ᾱ_t / (1 - ᾱ_t)`.
    pub fn snr(&self, t: usize) -> f32 {
        let a = self.alphas_cumprod[t];
        a / (1.0 - a)
    }

    /// The min-SNR-γ loss weight of a sample at `t` (Hang et al.; diffusers' `--snr_gamma`).
    pub fn min_snr_weight(&self, t: usize, gamma: f32, prediction: Prediction) -> f32 {
        let snr = self.snr(t);
        match prediction {
            Prediction::Epsilon => snr.min(gamma) / snr,
            Prediction::VPrediction => snr.min(gamma) / (snr + 1.0),
            Prediction::Sample => snr.min(gamma),
        }
    }
}

/// Standard normal draws from our seeded RNG (Box–Muller; candle's CPU RNG cannot be
/// seeded, and reproducible noise is the point).
pub fn normal(n: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let mut out = Vec::with_capacity(n + 1);
    while out.len() < n {
        let u1: f64 = 1.0 - rng.random::<f64>();
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let th = std::f64::consts::TAU * u2;
        out.push((r * th.cos()) as f32);
        out.push((r * th.sin()) as f32);
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn scaled_linear_matches_sd() {
        let s = Schedule::from_json(&serde_json::json!({
            "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "prediction_type": "epsilon"
        }))
        .unwrap();
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-6);
        // Values printed by diffusers 0.42's DDPMScheduler for the same config.
        assert!(
            (s.alphas_cumprod[999] - 0.004_660_095).abs() < 1e-7,
            "{}",
            s.alphas_cumprod[999]
        );
        assert!(
            (s.alphas_cumprod[500] - 0.276_332_47).abs() < 1e-6,
            "{}",
            s.alphas_cumprod[500]
        );
        let cos = Schedule::from_json(&serde_json::json!({"beta_schedule": "squaredcos_cap_v2"}))
            .unwrap();
        assert!(
            (cos.alphas_cumprod[10] - 0.999_278_8).abs() < 1e-6,
            "{}",
            cos.alphas_cumprod[10]
        );
        assert_eq!(s.prediction, Prediction::Epsilon);
        let bad = Schedule::from_json(&serde_json::json!({"beta_schedule": "exotic"}));
        assert!(bad.unwrap_err().to_string().contains("exotic"));
    }

    #[test]
    fn normal_draws_have_unit_moments() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = normal(200_001, &mut rng);
        assert_eq!(x.len(), 200_001);
        let mean = x.iter().map(|&v| v as f64).sum::<f64>() / x.len() as f64;
        let var = x.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / x.len() as f64;
        assert!(
            mean.abs() < 0.01 && (var - 1.0).abs() < 0.01,
            "{mean} {var}"
        );
    }
}
